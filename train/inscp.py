"""InsCP: continual pre-training of a CHAT model on target-language text wrapped in its own chat
template (Chen & Lee 2024), or the plain-text baseline orgCP.

Every text becomes one conversation: an empty user turn, the text as the assistant's answer, no
system prompt, loss on every token. Because the model keeps seeing its own template, it learns the
new language *as something it says in a chat*, and keeps answering in the language it is asked.

    torchrun --nproc_per_node=2 train/inscp.py --data zh.txt qa.jsonl --format inscp --out_dir runs/x
    python train/inscp.py          # the embedded default: SmolLM2-135M-Instruct on data/samples/, CPU, minutes

Every flag maps onto one field of InsCPConfig (and TrainConfig): `python train/inscp.py --help`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # torchrun train/inscp.py from a checkout

from data.formats import TEXT_FORMATS  # noqa: E402
from train import distributed, runlock  # noqa: E402
from train.config import _meta, choice, parse_args  # noqa: E402
from train.recipe import RecipeConfig, add_adapters, chat_template, load_model, loaders, token_files  # noqa: E402
from train.trainer import Trainer, run_main  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


@dataclass
class InsCPConfig(RecipeConfig):
    """InsCP / orgCP continual pre-training. The defaults are the embedded demo run."""
    format: str = field(default="inscp", metadata=_meta("inscp (chat-template wrapped) | orgcp (plain text + eos)"))
    data: list[str] = field(default_factory=lambda: [str(SAMPLES / "zh_tw.txt"), str(SAMPLES / "zh_tw_qa.jsonl")],
                            metadata=_meta("training data files (.txt / .jsonl)"))
    out_dir: str = field(default="runs/inscp", metadata=_meta("run folder", hash=False))
    max_steps: int = field(default=24, metadata=_meta("optimizer steps of the whole run"))
    seq_len: int = field(default=256, metadata=_meta("tokens per packed block"))
    lr: float = field(default=5e-4, metadata=_meta("peak learning rate"))
    eval_every: int = field(default=8, metadata=_meta("eval loss every N steps; 0 = only at the end", hash=False))
    save_every: int = field(default=8, metadata=_meta("checkpoint every N steps; 0 = only at the end", hash=False))

    DEFAULT_WARMUP = 3  # --warmup_steps when not given (at most --max_steps)
    RULES = {"format": choice(*TEXT_FORMATS)}


def done_message(summary: dict, out_dir: str) -> str:
    """Where the results are, for the user at the end of a run."""
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731  (None: the run was already complete)
    lines = [f"done: step {summary['step']}, loss {fmt(summary['loss'])}, eval loss {fmt(summary['eval_loss'])}",
             f"metrics  {Path(out_dir) / 'metrics.jsonl'}", f"model    {summary.get('final')}"]
    if summary.get("adapter"):
        lines.append(f"adapter  {summary['adapter']}")
    lines.append(f"chat:    python scripts/chat.py --model {summary.get('final')}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    cfg = parse_args(InsCPConfig, argv)
    with distributed.session(cfg.device or None) as info:
        # Everything that can refuse the run comes before anything is written to out_dir.
        model, tokenizer = load_model(cfg)
        # InsCP renders the model's own template with no system prompt (data/formats.inscp).
        template = chat_template(tokenizer, cfg.template)
        add_adapters(model, cfg)
        runlock.hold(cfg.out_dir)
        train_dir, eval_dir = token_files(cfg, cfg.format, tokenizer, template, info)
        train_loader, eval_loader = loaders(cfg, train_dir, eval_dir, tokenizer, info)
        trainer = Trainer(model, cfg, train_loader, eval_loader, tokenizer=tokenizer, dist_info=info)
        summary = trainer.fit()
        if info.is_main:
            print(done_message(summary, cfg.out_dir), flush=True)
        return summary


if __name__ == "__main__":
    run_main(main)
