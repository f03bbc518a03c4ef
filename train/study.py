"""Measured runs: train with train/inscp.py and take eval.quick's report along the way.

What a study or a sweep needs beyond one run's before/after report (train/report.py): the same
metrics at several points of one run (metric vs training tokens), flattened into one record per
point, appended to a JSONL file as soon as they are measured (a study of hours that is stopped
keeps every finished run and is resumed by skipping them), and aggregated over seeds.

    records = measured_run(["--format", "inscp", "--seed", "0", ...], at_steps=[50, 100, 200],
                           sizes=QuickSizes(nll_items=50), final_split="holdout")
    summary = aggregate(records, by=("format", "finetune"))   # mean and spread over seeds

One rank (the quick report runs on the live model, which one process holds whole).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from eval.quick import QuickSizes, quick_report
from model import assets
from model.checkpoint import load
from train import inscp
from train.recipe import chat_template

# The four metrics of the study, as (record key, where in a quick report). Answer NLL: lower is
# better; the rest are shares (higher is better, but for echo/degenerate).
METRICS = {
    "nll_zh": ("answer_nll", "drcd-zh-Hant", "answer_nll"),
    "nll_th": ("answer_nll", "xquad-th", "answer_nll"),
    "nll_en_qa": ("answer_nll", "xquad-en", "answer_nll"),
    "nll_en_chat": ("answer_nll", "alpaca-en", "answer_nll"),
    "aligned_en": ("alignment", "en", "aligned"),
    "aligned_zh": ("alignment", "zh-Hant", "aligned"),
    "aligned_th": ("alignment", "th", "aligned"),
    "echo_zh": ("alignment", "zh-Hant", "echo_degenerate"),
    "end_of_turn": ("overall", "end_of_turn"),
}


def flatten(report: dict) -> dict:
    """The METRICS of one quick report (None where the report has no such number, e.g.
    alpaca-en on the holdout split)."""
    out = {}
    for key, path in METRICS.items():
        node = report
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def measured_run(argv: list[str], at_steps: list[int], sizes: QuickSizes, final_split: str | None = None,
                 labels: dict | None = None, log=print) -> list[dict]:
    """Run train.inscp.main(argv) and quick-report the live model after each step in at_steps
    (dev split), and once more at the last step on `final_split` (e.g. "holdout": final
    numbers only). -> one record per report: labels + {"step", "tokens", "split", metrics...,
    "samples"}."""
    records: list[dict] = []
    wanted = set(at_steps)

    def measure(trainer, split: str) -> None:
        tok = trainer.tokenizer
        template = chat_template(tok, trainer.config.template)  # the run's own, as it trains with
        report = quick_report(trainer.model, tok, template, sizes, split=split)
        record = {**(labels or {}), "step": trainer.step, "tokens": trainer.tokens_seen, "split": split,
                  **flatten(report), "samples": {k: v["answer"] for k, v in report["samples"].items()},
                  "seconds": report["seconds"]["total"]}
        log(f"  step {trainer.step} ({trainer.tokens_seen:,} tokens, {split}): "
            + ", ".join(f"{k} {v:.3f}" for k, v in flatten(report).items() if isinstance(v, float)))
        records.append(record)

    def on_step(trainer) -> None:
        if trainer.step in wanted:
            measure(trainer, "data")
        if final_split and trainer.step == trainer.config.max_steps:
            measure(trainer, final_split)

    inscp.main(argv, on_step=on_step)
    return records


def start_records(sizes: QuickSizes, splits: tuple[str, ...] = ("data",), model_path: str | None = None) -> list[dict]:
    """The starting model's reports (step 0, run "start"), one per split: what every run of a
    study or sweep is compared with (default model: SmolLM2-135M-Instruct)."""
    model, tokenizer = load(model_path or assets.smollm2_gguf(), dtype=torch.float32)
    template = chat_template(tokenizer, "")
    out = []
    for split in splits:
        report = quick_report(model, tokenizer, template, sizes, split=split)
        out.append({"run": "start", "format": "start", "finetune": "-", "seed": None, "step": 0, "tokens": 0,
                    "split": split, **flatten(report),
                    "samples": {k: v["answer"] for k, v in report["samples"].items()}})
    return out


def records_with_start(file: str | os.PathLike, sizes: QuickSizes, splits: tuple[str, ...] = ("data",)) -> list[dict]:
    """The records already in `file` (a resumed study), the starting model's measured and
    appended first when missing."""
    records = read_jsonl(file)
    if not any(r["run"] == "start" for r in records):
        start = start_records(sizes, splits)
        append_jsonl(start, file)
        records += start
    return records


def append_jsonl(records: list[dict], path: str | os.PathLike) -> None:
    """Append records (one JSON object a line), flushed to disk: a stopped study keeps them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(records: list[dict], path: str | os.PathLike) -> None:
    """Replace the file's records (atomically: written beside it, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def aggregate(records: list[dict], by: tuple[str, ...], over: str = "seed") -> dict:
    """{(group values..., split, tokens): {metric: (mean, spread, n)}}: the mean over `over`
    (seeds) and the spread as the sample standard deviation (0 for a single run)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k) for k in by) + (r["split"], r["tokens"])].append(r)
    out = {}
    for key, rows in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0][:-1]) + (kv[0][-1],)):
        stats = {}
        for metric in METRICS:
            values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[metric] = (statistics.fmean(values), spread, len(values))
        stats["runs"] = sorted({r.get(over) for r in rows}, key=str)
        out[key] = stats
    return out
