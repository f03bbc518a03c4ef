"""InsCP vs orgCP, seeded: the quick-report metrics along training, mean and spread over seeds.

    python scripts/study_inscp.py --out docs/study --seeds 0 1 2 --formats inscp orgcp \\
        --finetune lora --steps 200 --points 4

Every run trains SmolLM2-135M-Instruct (the default model) with train/inscp.py on the same data
(default: ../shared/data/mono/zh_tw_drcd.dev.txt, 1000 Traditional Chinese paragraphs, 879k
SmolLM2 tokens) with the same budget and settings; only --format (and the seed: LoRA init,
dropout, data order) differs. eval.quick's report is taken at --points evenly spaced steps on the
DEV split (the curve) and once more at the end on the HOLDOUT split (final numbers only, labelled
as such); the starting model is measured once on both. Records go to OUT/runs.jsonl as soon as
they are measured; running the same command again skips finished runs. OUT/study.md gets the
table (mean +- standard deviation over seeds) and OUT/study_<metric>.svg the curves.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data.flags import Flags, flag, parse, positive
from eval.quick import QuickSizes
from eval.report import svg_line_chart
from model import assets
from train.study import METRICS, aggregate, append_jsonl, measured_run, records_with_start, rewrite_jsonl

TITLES = {
    "nll_zh": "Answer NLL, DRCD zh-Hant (lower is better)", "nll_th": "Answer NLL, XQuAD th",
    "nll_en_qa": "Answer NLL, XQuAD en", "nll_en_chat": "Answer NLL, Alpaca en (chat answers)",
    "aligned_en": "English prompts answered in English (echo-free share)",
    "aligned_zh": "zh-Hant prompts answered in zh-Hant (echo-free share)",
    "aligned_th": "Thai prompts answered in Thai (echo-free share)",
    "echo_zh": "zh-Hant prompts: echo/degenerate share (lower is better)",
    "end_of_turn": "Answers that end their turn within 64 tokens",
}


def _default_data() -> list[str]:
    try:
        return [str(assets.shared_file("data", "mono", "zh_tw_drcd.dev.txt"))]
    except FileNotFoundError:
        return []


@dataclass
class StudyArgs(Flags):
    """InsCP vs orgCP over seeds (see the module docstring)."""
    out: str = flag("docs/study", "folder of the results: runs.jsonl, study.md, study_*.svg")
    runs: str = flag("runs/study", "folder of the training runs (checkpoints; not results)")
    formats: list[str] = flag(["inscp", "orgcp"], "formats compared")
    seeds: list[int] = flag([0, 1, 2], "seeds (LoRA init, dropout, data order)")
    finetune: list[str] = flag(["lora"], "lora and/or full")
    data: list[str] = flag(help="training text (default: the shared DRCD dev paragraphs)", factory=_default_data)
    steps: int = flag(200, "optimizer steps per run (x micro-batch x seq-len tokens)", rule=positive)
    points: int = flag(4, "dev reports per run, evenly spaced (the last at the final step)", rule=positive)
    lr: float = flag(2e-4, "peak learning rate (LoRA); full fine-tuning uses --full-lr", rule=positive)
    full_lr: float = flag(2e-5, "peak learning rate of full fine-tuning", rule=positive)
    lora_r: int = flag(16, "LoRA rank", rule=positive)
    seq_len: int = flag(256, "tokens per packed block", rule=positive)
    micro_batch_size: int = flag(4, "blocks per step", rule=positive)
    warmup_steps: int = flag(10, "linear warm-up steps", rule=positive)
    mixed_precision: str = flag("auto", "passed to train/inscp.py", choices=("auto", "bf16", "fp32"))
    sizes: QuickSizes = flag(QuickSizes(nll_items=48, prompts=16, batch_size=48), "the quick report's sizes")


# What makes two runs of the same name comparable; the rest (which formats, seeds, where) may grow.
RUN_SETTINGS = ("data", "steps", "points", "lr", "full_lr", "lora_r", "seq_len", "micro_batch_size",
                "warmup_steps", "mixed_precision", "sizes")


def check_settings(args: StudyArgs, out: Path) -> None:
    """OUT/settings.json records what the runs in OUT/runs.jsonl were measured with. A later call
    with other settings would skip those runs as finished and mix the two in one table, so it is
    refused in one line; a new OUT (or the same settings) is fine."""
    now = {k: v for k, v in dataclasses.asdict(args).items() if k in RUN_SETTINGS}
    file = out / "settings.json"
    if file.exists():
        before = json.loads(file.read_text(encoding="utf-8"))
        changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in RUN_SETTINGS
                   if before.get(k) != now[k]]
        if changed:
            raise SystemExit(f"scripts/study_inscp.py: {out / 'runs.jsonl'} was measured with other settings "
                             f"({'; '.join(changed)}): pass another --out, or remove that folder")
    elif (out / "runs.jsonl").exists():
        raise SystemExit(f"scripts/study_inscp.py: {out / 'runs.jsonl'} has no settings.json beside it, so its "
                         f"runs cannot be checked against these: pass another --out, or remove that folder")
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(now, indent=1) + "\n", encoding="utf-8")


def run_argv(args: StudyArgs, fmt: str, finetune: str, seed: int, folder: Path) -> list[str]:
    return ["--format", fmt, "--finetune", finetune, "--seed", str(seed), "--data", *args.data,
            "--max-steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--micro-batch-size", str(args.micro_batch_size), "--lr", str(args.lr if finetune == "lora" else args.full_lr),
            "--lora-r", str(args.lora_r), "--warmup-steps", str(args.warmup_steps), "--eval-split", "0",
            "--mixed-precision", args.mixed_precision, "--no-report", "--no-export", "--no-progress",
            "--out-dir", str(folder)]


def table(summary: dict, split: str, tokens: int | None = None) -> str:
    keys = [k for k in summary if k[-2] == split and (tokens is None or k[-1] in (0, tokens))]
    metrics = [m for m in METRICS if any(m in summary[k] for k in keys)]
    lines = ["| format | finetune | tokens | " + " | ".join(metrics) + " |",
             "|---|---|---:|" + "---:|" * len(metrics)]
    for key in keys:
        fmt, finetune, _, tok = key
        cells = []
        for m in metrics:
            if m not in summary[key]:
                cells.append("–")
                continue
            mean, spread, n = summary[key][m]
            cells.append(f"{mean:.3f} ± {spread:.3f}" if n > 1 else f"{mean:.3f}")
        lines.append(f"| {fmt} | {finetune} | {tok:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(args: StudyArgs, records: list[dict], out: Path) -> None:
    summary = aggregate(records, by=("format", "finetune"))
    dev_tokens = sorted({k[-1] for k in summary if k[-2] == "data"})
    final = max((k[-1] for k in summary if k[-2] == "holdout"), default=None)
    text = ["# InsCP vs orgCP (scripts/study_inscp.py)\n",
            f"Runs: {len({r['run'] for r in records if r['run'] != 'start'})}, seeds "
            f"{sorted({r['seed'] for r in records if r['run'] != 'start'})}, "
            f"{args.steps} steps of {args.micro_batch_size} x {args.seq_len} tokens, data {args.data}.",
            "Mean ± sample standard deviation over seeds.\n",
            "## Final numbers, HOLDOUT split (never used for choosing anything)\n", table(summary, "holdout", final),
            "\n## Along training, DEV split\n", table(summary, "data")]
    (out / "study.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    groups = sorted({k[:2] for k in summary if k[-2] == "data" and k[0] != "start"})
    for metric in METRICS:
        series = {}
        for fmt, finetune in groups:
            points = []
            for tok in dev_tokens:
                stats = summary.get((fmt, finetune, "data", tok)) or (summary.get(("start", "-", "data", 0))
                                                                     if tok == 0 else None)
                points.append(stats[metric][:2] if stats and metric in stats else None)
            series[f"{fmt} ({finetune})"] = points
        if any(p is not None for ps in series.values() for p in ps):
            svg = svg_line_chart(TITLES[metric], dev_tokens, series, "training tokens", metric)
            (out / f"study_{metric}.svg").write_text(svg, encoding="utf-8")


def main(argv=None) -> None:
    args = parse(StudyArgs, argv, prog="scripts/study_inscp.py", description=__doc__)
    out = Path(args.out)
    runs_file = out / "runs.jsonl"
    check_settings(args, out)
    records = records_with_start(runs_file, args.sizes, ("data", "holdout"))
    at = [round(args.steps * (i + 1) / args.points) for i in range(args.points)]
    for finetune in args.finetune:
        for seed in args.seeds:
            for fmt in args.formats:
                name = f"{fmt}-{finetune}-s{seed}"
                if any(r["run"] == name and r["split"] == "holdout" for r in records):
                    continue
                folder = Path(args.runs) / name
                if any(r["run"] == name for r in records) or folder.exists():  # stopped midway: start again
                    records = [r for r in records if r["run"] != name]
                    rewrite_jsonl(records, runs_file)
                    shutil.rmtree(folder, ignore_errors=True)
                print(f"{name}: training {args.steps} steps", flush=True)
                t0 = time.time()
                new = measured_run(run_argv(args, fmt, finetune, seed, folder), at, args.sizes, "holdout",
                                   labels={"run": name, "format": fmt, "finetune": finetune, "seed": seed})
                append_jsonl(new, runs_file)
                records += new
                print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
                write_outputs(args, records, out)
    write_outputs(args, records, out)
    print(f"wrote {out / 'study.md'}", flush=True)


if __name__ == "__main__":
    main()
