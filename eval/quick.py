"""A quick report on a model that says something even at 135M parameters, and a before/after
comparison of two such reports: what a training run writes at its end.

    before = quick_report(model, tokenizer, template)     # -> dict (JSON-safe)
    ... train ...
    after = quick_report(model, tokenizer, template)
    compare(before, after, out_dir=run_dir)                 # -> RUN/report.md, report.json, chart_*.svg

Measured on the dev split, greedy, fixed items (the same command gives the same numbers):
- answer NLL (eval.answer_nll): mean NLL per token of the reference answers of DRCD (zh-Hant),
  XQuAD (th, en) and Alpaca (en) given their questions, in the chat template, and the NLL of the
  end-of-turn token after each reference answer; no generation;
- language alignment without echoes (eval.alignment + eval.echo): share of answers in the
  prompt's language that are neither an echo of the prompt nor a degenerate repetition, with the
  echo/degenerate share beside it, for en, th and zh-Hant prompts;
- end-of-turn rate: share of those answers that ended with the template's stop id within the
  token budget (per prompt set and over all);
- one Traditional Chinese and one English sample answer (SAMPLE_PROMPTS).
QuickSizes is sized for under 2 minutes per SmolLM2-135M on 2 idle CPU cores: about 11k scored
tokens, one prefill of 24 prompts and 64 decode steps at batch 24, plus 64 steps for the samples.

The model is put in eval mode (no LoRA dropout) and its training mode restored afterwards. Call it
on a model whose parameters are whole tensors on one device (a plain or LoRA-wrapped Llama, e.g.
the merged final model), on one rank.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eval import alignment, answer_nll
from eval.common import ChatRunner
from model.chat import get_template
from eval.report import CHART_TITLES, chart_file, charts, clean, markdown_table, write_charts, write_json

SAMPLE_PROMPTS = {"zh-Hant": "請用繁體中文介紹台灣的夜市。", "en": "What is the capital of France?"}


@dataclass
class QuickSizes:
    """How much the quick report reads and generates (None: every item)."""
    nll_items: int | None = 8           # reference answers per answer-NLL set
    nll_max_chars: int | None = 400     # ... each with passage + question + answer of at most this many characters
    prompts: int | None = 8             # prompts per alignment set (en, th, zh-Hant)
    max_new_tokens: int = 64     # budget per generated answer (end-of-turn means: stopped within it)
    batch_size: int = 24         # answers generated together: all 3 x 8 prompts in one batch (a decode
                                 # step of 24 rows costs far less than 3 steps of 8 on a CPU)
    nll_batch_size: int = 4      # sequences scored together (each holds [T, vocab] log-probs)


def data_files() -> list:
    """The dev files quick_report reads (FileNotFoundError names the first one missing)."""
    return ([answer_nll.set_file(name) for name in answer_nll.sets_for("data")]
            + [alignment.prompt_file(name) for name in alignment.PROMPT_SETS])


def quick_report(model, tokenizer, template=None, sizes: QuickSizes | None = None, runner=None,
                 log=None, split: str = "data", compile: bool = False) -> dict:
    """-> {"answer_nll": {set: {"answer_nll", "eot_nll", "lang", "tokens", "n", "truncated"}},
           "alignment": {"en"|"th"|"zh-Hant": {"aligned", "echo_degenerate", "end_of_turn", "shares", ...}},
           "overall": {"end_of_turn": share over all prompts},
           "samples": {"zh-Hant"|"en": {"prompt", "answer", "stopped"}},
           "sizes": asdict(sizes), "seconds": {"nll", "generation", "total"}}.

    template: the chat template (default: the tokenizer's stored one, model.chat.get_template; pass
    the one the run trained with). runner: what answers the
    prompts (default: ChatRunner, greedy, with `sizes`); a runner without `.results` (e.g.
    model.tcot.TCOTRunner, whose answer is the text after <TH>) gives end_of_turn None.
    log(str): progress lines (default: none). split: "data" (dev, for choosing anything) or
    "holdout" (final numbers only; alpaca-en has no holdout half and is left out). compile: the
    default runner decodes with the compiled one-token step."""
    sizes = sizes or QuickSizes()
    template = template or get_template(tokenizer)
    runner = runner or ChatRunner(model, tokenizer, template, max_new_tokens=sizes.max_new_tokens,
                                  batch_size=sizes.batch_size, compile=compile)
    was_training = getattr(model, "training", False)
    model.eval()
    start = time.time()
    try:
        nll = answer_nll.evaluate(model, template, limit=sizes.nll_items, max_chars=sizes.nll_max_chars,
                                  batch_size=sizes.nll_batch_size, split=split)
        nll_done = time.time()
        if log:
            log(f"quick: answer NLL in {nll_done - start:.0f}s")
        aligned = alignment.evaluate(runner, list(alignment.PROMPT_SETS), sizes.prompts, split)
        samples = _samples(runner)
        done = time.time()
        if log:
            log(f"quick: generation in {done - nll_done:.0f}s")
    finally:
        model.train(was_training)
    stops = [e["stopped"] for r in aligned.values() for e in r["examples"]]
    return clean({
        "answer_nll": nll,
        "alignment": aligned,
        "overall": {"end_of_turn": None if None in stops else sum(stops) / max(len(stops), 1)},
        "samples": samples,
        "sizes": asdict(sizes),
        "split": split,
        "seconds": {"nll": nll_done - start, "generation": done - nll_done, "total": done - start},
    })


def _samples(runner) -> dict:
    names = list(SAMPLE_PROMPTS)
    answers, stopped = alignment.ask(runner, [SAMPLE_PROMPTS[n] for n in names], "quick samples")
    return {n: {"prompt": SAMPLE_PROMPTS[n], "answer": a, "stopped": None if stopped is None else stopped[i]}
            for i, (n, a) in enumerate(zip(names, answers))}


def compare(before: dict, after: dict, out_dir: str | Path | None = None,
            names: tuple[str, str] = ("before", "after"), title: str = "Quick report") -> dict:
    """Side by side of two quick_report dicts. -> {"markdown": report text, "charts": {unit: SVG},
    "paths": {name: Path}}; with out_dir, writes out_dir/report.md, report.json (both reports) and
    chart_<unit>.svg (rates; answer NLL)."""
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"names must be two different labels, got {names!r}")
    results = {"models": {names[0]: before, names[1]: after}}
    md = [f"# {title}: {names[0]} vs {names[1]}", "",
          "Dev split, greedy, the same items for both (eval/quick.py). Answer NLL: lower is better; "
          "eot_nll: NLL of the end-of-turn token after the reference answer (lower is better); "
          "aligned = answers in the prompt's language that are neither an echo of the prompt nor a "
          "degenerate repetition (eval/echo.py); end_of_turn = answers that stopped within "
          f"{after.get('sizes', {}).get('max_new_tokens', '?')} new tokens.", "",
          markdown_table(results, change=True), ""]
    svgs = charts(results)
    paths: dict[str, Path] = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths.update(write_charts(svgs, out_dir))
        md += [line for unit in svgs for line in (f"![{CHART_TITLES[unit]}]({chart_file(unit)})", "")]
    md += ["## Sample answers", ""]
    for lang, sample in after.get("samples", {}).items():
        md += [f"**{sample['prompt']}**", ""]
        for name, report in zip(names, (before, after)):
            answer = report.get("samples", {}).get(lang, {}).get("answer", "")
            md += [f"- {name}: {_one_line(answer)}"]
        md += [""]
    markdown = "\n".join(md)
    if out_dir is not None:
        paths["json"] = write_json(results, out_dir / "report.json")
        paths["markdown"] = out_dir / "report.md"
        paths["markdown"].write_text(markdown, encoding="utf-8")
    return {"markdown": markdown, "charts": svgs, "paths": paths}


def _one_line(text: str, limit: int = 300) -> str:
    """An answer as one Markdown line: newlines shown as ⏎, cut at `limit` characters."""
    flat = text.replace("\r", "").replace("\n", " ⏎ ").replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit] + " …"
