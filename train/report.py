"""The before/after report every training run ends with (`--report`, on by default; `--no-report`).

eval.quick's report of the starting model is computed once, at the start (before training, on
rank 0) and kept in RUN/report_before.json, so a resumed run reuses it; at the end the report of
the result (the merged final model, RUN/final, rank 0) is compared with it by eval.quick.compare
into RUN/report.md, RUN/report.json and RUN/chart_*.svg, and printed as a small table: answer NLL
per language (before -> after, %), the echo-free share of prompts answered in their own language
per prompt language, the end-of-turn rate, and one Traditional Chinese and one English answer of
each model side by side.

The other ranks wait in distributed.on_main's broadcast meanwhile. The model runs on the run's
device; quick_report puts it in eval mode and restores its training mode.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from data.flags import problem_line
from data.kd import model_identity
from eval import quick
from eval.common import ChatRunner
from model.checkpoint import load
from model.tcot import TCOTRunner, tcot_tags
from model.vocab import SCRIPTS
from train import distributed
from train.errors import TrainError, writing

BEFORE_FILE = "report_before.json"


def sizes_problems(sizes: quick.QuickSizes, name: str = "report_sizes") -> list[str]:
    """'--report-sizes.x value: allowed' for a size below 1 (None, for the item counts: all items)."""
    out = []
    for f in dataclasses.fields(sizes):
        value = getattr(sizes, f.name)
        if value is not None and value < 1:
            out.append(problem_line(f"{name}.{f.name}", value, "must be >= 1"))
    return out


def check_data() -> None:
    """Refuse --report before any work when the dev data it reads is missing (one line)."""
    try:
        quick.data_files()
    except FileNotFoundError as err:
        raise TrainError(f"--report: the quick report's data is missing ({err}): pass --no-report") from None


def _on_device(model, device: torch.device, fn):
    """fn(model) with the model on `device` (the run's), then back where it was (the Trainer
    takes the model on the CPU)."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        return fn(model)
    finally:
        model.to(home)


def before_report(run_dir: str | Path, model_path: str, start, sizes: quick.QuickSizes, info: distributed.DistInfo,
                  template: dict) -> dict:
    """The starting model's quick report: RUN/report_before.json when it holds one of this very
    start (model weights, template flags, sizes), else computed now on rank 0 and written there.
    start() -> (model, tokenizer, chat template), called on rank 0 only when the report is
    computed; template: the run's --template / --system (they enter the key). -> the report on
    every rank."""
    key = json.loads(json.dumps({"model": model_identity(model_path), "template": template,
                                 "sizes": dataclasses.asdict(sizes)}))
    path = Path(run_dir) / BEFORE_FILE

    def compute() -> dict:
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                print(f"report: the starting model's report is {path} (computed by an earlier start of this run)",
                      flush=True)
                return saved["report"]
        print(f"report: the starting model's quick report ({model_path}) ...", flush=True)
        model, tokenizer, chat_template = start()
        report = _on_device(model, info.device, lambda m: quick.quick_report(m, tokenizer, chat_template, sizes))
        with writing("the starting model's report", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"key": key, "report": report}, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        return report
    return distributed.on_main(compute)


class TargetTCOTRunner:
    """A TransLLM model's two ways of answering, as quick_report's runner: a prompt with a
    character of the target script (--script) by TCOT (model.tcot.TCOTRunner: the text after
    <TAG>), any other prompt directly (eval.common.ChatRunner), with the <RESPONSE> tag that
    recovery-KD training puts before such an answer removed. It has no `.results`: TCOT cannot
    tell whether an answer ended its turn, so quick_report's end-of-turn rate of this model is
    None (n/a)."""

    def __init__(self, model, tokenizer, template, sizes: quick.QuickSizes, script: str, tag: str):
        self.target = re.compile(SCRIPTS.get(script, script))
        self.tags = tcot_tags(tag)
        self.tcot = TCOTRunner(model, tokenizer, template, sizes.max_new_tokens, tags=self.tags)
        self.direct = ChatRunner(model, tokenizer, template, max_new_tokens=sizes.max_new_tokens,
                                 batch_size=sizes.batch_size, postprocess=self._without_response_tag)
        self.truncated = 0

    def _without_response_tag(self, text: str) -> str:
        response = self.tags[1]
        return text.split(response, 1)[1] if response in text else text

    def answer(self, conversations: list[list[dict]], desc: str | None = None) -> list[str]:
        is_target = [bool(self.target.search(c[-1]["content"])) for c in conversations]
        pick = lambda want: [c for c, t in zip(conversations, is_target) if t == want]  # noqa: E731
        by_tcot = iter(self.tcot.answer(pick(True), desc=desc and desc + " (tcot)"))
        direct = iter(self.direct.answer(pick(False), desc=desc))
        self.truncated = self.direct.truncated
        return [next(by_tcot) if t else next(direct) for t in is_target]


def after_report(run_dir: str | Path, before: dict, final: str | Path, template_of, sizes: quick.QuickSizes,
                 info: distributed.DistInfo, names: tuple[str, str] = ("before", "after"),
                 runner_of=None) -> dict | None:
    """The result's quick report (the merged model at `final`, rank 0), compared with `before`
    into RUN/report.md, report.json and chart_*.svg; prints the table. template_of(tokenizer) ->
    the run's chat template; runner_of(model, tokenizer, template) -> quick_report's runner
    (default: its ChatRunner). -> eval.quick.compare's result without the SVG text (rank 0)."""
    def compute():
        print(f"report: the result's quick report ({final}) ...", flush=True)
        model, tokenizer = load(final, dtype=torch.float32, device=info.device)
        template = template_of(tokenizer)
        runner = runner_of(model, tokenizer, template) if runner_of else None
        after = quick.quick_report(model, tokenizer, template, sizes, runner=runner)
        del model
        with writing("the report", run_dir):
            out = quick.compare(before, after, out_dir=run_dir, names=names)
        print(summary_table(before, after, names), flush=True)
        print("report: " + ", ".join(str(p) for p in out["paths"].values()), flush=True)
        return {"markdown": out["markdown"], "paths": {k: str(p) for k, p in out["paths"].items()}}
    return distributed.on_main(compute)


# ---- the printed table ------------------------------------------------------------------------------
def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _change(a, b) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{_num(a)} -> {_num(b)}" + (f" ({(b - a) / a:+.1%})" if a else "")


def _cut(text: str, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def summary_table(before: dict, after: dict, names: tuple[str, str] = ("before", "after"), width: int = 60) -> str:
    """Two quick_report dicts -> the few lines a run prints at its end (a Markdown table)."""
    a, b = names
    rows = [f"| quick report | {a} -> {b} |", "|---|---|"]
    for name, entry in before.get("answer_nll", {}).items():
        later = after.get("answer_nll", {}).get(name, {})
        rows.append(f"| answer NLL {name} | {_change(entry.get('answer_nll'), later.get('answer_nll'))} |")
    for lang, entry in before.get("alignment", {}).items():
        later = after.get("alignment", {}).get(lang, {})
        rows.append(f"| {lang} prompts answered in {lang}, no echo | "
                    f"{_num(entry.get('aligned'), 2)} -> {_num(later.get('aligned'), 2)} |")
    rows.append(f"| end-of-turn rate | {_num(before.get('overall', {}).get('end_of_turn'), 2)} -> "
                f"{_num(after.get('overall', {}).get('end_of_turn'), 2)} |")
    rows += ["", f"| prompt | {a} | {b} |", "|---|---|---|"]
    for lang, sample in before.get("samples", {}).items():
        later = after.get("samples", {}).get(lang, {})
        rows.append(f"| {sample['prompt']} | {_cut(sample.get('answer', ''), width)} | "
                    f"{_cut(later.get('answer', ''), width)} |")
    return "\n".join(rows)
