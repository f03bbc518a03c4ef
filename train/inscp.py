"""InsCP: continual pre-training of a CHAT model on target-language text wrapped in its own chat
template (Chen & Lee 2024), or the plain-text baseline orgCP.

Every text becomes one conversation: an empty user turn, the text as the assistant's answer, no
system prompt, loss on every token. Because the model keeps seeing its own template, it learns the
new language *as something it says in a chat*, and keeps answering in the language it is asked.

    torchrun --nproc_per_node=2 train/inscp.py --data zh.txt qa.jsonl --format inscp --out-dir runs/x
    python -m train.inscp          # the embedded default: SmolLM2-135M-Instruct on data/samples/, CPU, minutes

Every flag maps onto one field of InsCPConfig (and TrainConfig): `python -m train.inscp --help`. The
run ends with the before/after report of train/report.py (`--no-report`: without).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.flags import flag
from data.formats import TEXT_FORMATS
from train import distributed, report, runlock
from train.config import parse_args
from train.recipe import RecipeConfig, add_adapters, chat_template, load_model, loaders, model_path, token_files
from train.trainer import Trainer, run_main

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


@dataclass
class InsCPConfig(RecipeConfig):
    """InsCP / orgCP continual pre-training. The defaults are the embedded demo run."""
    format: str = flag("inscp", "inscp: wrapped in the chat template; orgcp: plain text + eos", choices=TEXT_FORMATS)

    # The demo's settings were chosen on dev data by scripts/sweep_demo.py (docs/demo_sweep/sweep.md):
    # 8 steps at lr 5e-4 lower the zh-Hant answer NLL most among the settings that keep English
    # (24 steps at 5e-4, the earlier default, answered only 31% of English prompts in English).
    defaults = {"data": [str(SAMPLES / "zh_tw.txt"), str(SAMPLES / "zh_tw_qa.jsonl")], "out_dir": "runs/inscp",
                "max_steps": 8, "seq_len": 256, "lr": 5e-4, "eval_every": 4, "save_every": 4}
    DEFAULT_WARMUP = 3  # --warmup-steps when not given (at most --max-steps)


def done_message(summary: dict, out_dir: str) -> str:
    """Where the results are, for the user at the end of a run."""
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731  (None: the run was already complete)
    lines = [f"done: step {summary['step']}, loss {fmt(summary['loss'])}, eval loss {fmt(summary['eval_loss'])}",
             f"metrics  {Path(out_dir) / 'metrics.jsonl'}"]
    if not summary.get("final"):
        return "\n".join(lines + ["model    not exported (--no-export)"])
    lines.append(f"model    {summary['final']}")
    if summary.get("adapter"):
        lines.append(f"adapter  {summary['adapter']}")
    lines.append(f"chat:    python scripts/chat.py --model {summary['final']}")
    return "\n".join(lines)


def main(argv=None, on_step=None) -> dict:
    """Run InsCP/orgCP from command-line flags -> the Trainer's summary. on_step(trainer): see
    Trainer.fit (scripts/study_inscp.py measures the model along the way with it)."""
    cfg = parse_args(InsCPConfig, argv)
    with distributed.session(cfg.device or None) as info:
        # Everything that can refuse the run comes before anything is written to out_dir.
        if cfg.report:
            report.check_data()
        model, tokenizer = load_model(cfg)
        # InsCP renders the model's own template with no system prompt (data/formats.inscp).
        template = chat_template(tokenizer, cfg.template)
        lora = add_adapters(model, cfg)
        runlock.hold(cfg.out_dir)
        train_dir, eval_dir = token_files(cfg, cfg.format, tokenizer, template, info)
        train_loader, eval_loader = loaders(cfg, train_dir, eval_dir, tokenizer, info)
        # the fresh adapter adds exactly 0 (B = 0): this is the starting model's report
        before = report.before_report(cfg.out_dir, model_path(cfg), lambda: (model, tokenizer, template),
                                      cfg.report_sizes, info, {"template": cfg.template}) if cfg.report else None
        trainer = Trainer(model, cfg, train_loader, eval_loader, tokenizer=tokenizer, dist_info=info, lora=lora)
        summary = trainer.fit(on_step)
        if info.is_main:
            print(done_message(summary, cfg.out_dir), flush=True)
        if before is not None:
            summary["report"] = report.after_report(cfg.out_dir, before, Path(cfg.out_dir) / "final",
                                                    lambda tok: chat_template(tok, cfg.template), cfg.report_sizes, info)
        return summary


if __name__ == "__main__":
    run_main(main)
