"""Choose the demo's defaults (`make demo` = train/inscp.py on data/samples/) on DEV data only.

    python scripts/sweep_demo.py --out docs/demo_sweep --lr 1e-4 2e-4 5e-4 --steps 8 16 24 --lora-r 16

Each setting trains the embedded demo (InsCP LoRA on the bundled Traditional Chinese sample) and
takes eval.quick's report of the result on the dev split; the starting model is measured once.
A setting is acceptable when, against the starting model:
  - the Traditional Chinese answer NLL falls (the gain, in %),
  - the English answer NLL (Alpaca chat answers and XQuAD) rises by less than --max-en-rise %,
  - English prompts are still answered in English (echo-free share >= --min-en-aligned),
  - the end-of-turn rate does not drop;
the chosen one is the acceptable setting with the largest zh gain. Results go to OUT/sweep.jsonl
(resumable: finished settings are skipped) and OUT/sweep.md.
"""
from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

from data.flags import Flags, flag, parse, positive
from eval.quick import QuickSizes
from train.study import append_jsonl, measured_run, records_with_start


@dataclass
class SweepArgs(Flags):
    """The demo's settings, chosen on dev data (see the module docstring)."""
    out: str = flag("docs/demo_sweep", "folder of the results: sweep.jsonl, sweep.md")
    runs: str = flag("runs/sweep", "folder of the training runs")
    lr: list[float] = flag([1e-4, 2e-4, 5e-4], "peak learning rates")
    steps: list[int] = flag([8, 16, 24], "optimizer steps")
    lora_r: list[int] = flag([16], "LoRA ranks (alpha = 2r)")
    seed: int = flag(0, "seed of every run")
    max_en_rise: float = flag(3.0, "largest allowed rise of the English answer NLL, in %", rule=positive)
    min_en_aligned: float = flag(0.95, "smallest allowed echo-free share of English prompts answered in English")
    sizes: QuickSizes = flag(QuickSizes(nll_items=24, prompts=16, batch_size=48), "the quick report's sizes")


def setting_name(lr: float, steps: int, r: int) -> str:
    return f"lr{lr:g}-steps{steps}-r{r}"


def judge(row: dict, start: dict, args: SweepArgs) -> dict:
    """How a setting compares with the starting model, and whether it passes the demo's bar."""
    pct = lambda k: 100 * (row[k] - start[k]) / start[k]  # noqa: E731
    out = {"zh_gain_pct": -pct("nll_zh"), "en_chat_rise_pct": pct("nll_en_chat"), "en_qa_rise_pct": pct("nll_en_qa")}
    out["ok"] = (out["zh_gain_pct"] > 0 and out["en_chat_rise_pct"] < args.max_en_rise
                 and out["en_qa_rise_pct"] < args.max_en_rise and row["aligned_en"] >= args.min_en_aligned
                 and row["end_of_turn"] >= start["end_of_turn"])
    return out


def write_table(rows: list[dict], start: dict, args: SweepArgs, out: Path) -> dict | None:
    judged = [(r, judge(r, start, args)) for r in rows]
    ok = [(r, j) for r, j in judged if j["ok"]]
    best = max(ok, key=lambda rj: rj[1]["zh_gain_pct"])[0] if ok else None
    lines = ["# Demo sweep (scripts/sweep_demo.py): DEV split only\n",
             f"Starting model: nll zh {start['nll_zh']:.3f}, en chat {start['nll_en_chat']:.3f}, en QA "
             f"{start['nll_en_qa']:.3f}, English prompts in English {start['aligned_en']:.3f}, end of turn "
             f"{start['end_of_turn']:.3f}. Bar: zh NLL falls, English NLL rises < {args.max_en_rise}%, English "
             f"answers >= {args.min_en_aligned}, end-of-turn rate not lower.\n",
             "| setting | nll zh (gain %) | nll en chat (rise %) | nll en QA (rise %) | en in en | zh in zh | "
             "end of turn | passes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r, j in judged:
        mark = "**chosen**" if r is best else ("yes" if j["ok"] else "no")
        lines.append(f"| {r['run']} | {r['nll_zh']:.3f} ({j['zh_gain_pct']:+.1f}) | {r['nll_en_chat']:.3f} "
                     f"({j['en_chat_rise_pct']:+.1f}) | {r['nll_en_qa']:.3f} ({j['en_qa_rise_pct']:+.1f}) | "
                     f"{r['aligned_en']:.3f} | {r['aligned_zh']:.3f} | {r['end_of_turn']:.3f} | {mark} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return best


def main(argv=None) -> None:
    args = parse(SweepArgs, argv, prog="scripts/sweep_demo.py", description=__doc__)
    out = Path(args.out)
    file = out / "sweep.jsonl"
    rows = records_with_start(file, args.sizes)
    for lr, steps, r in itertools.product(args.lr, args.steps, args.lora_r):
        name = setting_name(lr, steps, r)
        if any(row["run"] == name for row in rows):
            continue
        folder = Path(args.runs) / name
        shutil.rmtree(folder, ignore_errors=True)
        argv = ["--lr", str(lr), "--max-steps", str(steps), "--lora-r", str(r), "--lora-alpha", str(2 * r),
                "--seed", str(args.seed), "--out-dir", str(folder), "--no-report", "--no-export", "--no-progress",
                "--save-every", "0", "--eval-every", "0"]
        print(f"{name}: training", flush=True)
        new = measured_run(argv, [steps], args.sizes, labels={"run": name, "lr": lr, "steps": steps, "lora_r": r})
        append_jsonl(new, file)
        rows += new
        write_table([x for x in rows if x["run"] != "start"], next(x for x in rows if x["run"] == "start"), args, out)
    best = write_table([x for x in rows if x["run"] != "start"], next(x for x in rows if x["run"] == "start"), args, out)
    print(f"wrote {out / 'sweep.md'}; chosen: {best['run'] if best else 'none passes the bar'}", flush=True)


if __name__ == "__main__":
    main()
