"""Recovery-KD data for TransLLM: the frozen ORIGINAL chat model answers English instructions.

    python scripts/generate_kd.py --instructions ../shared/data/instruct/alpaca_en_demo.jsonl \\
        --out runs/kd/smollm2.jsonl --limit 64 --max-new-tokens 256
    python scripts/generate_kd.py --model path/to/llama-2-7b-chat --out kd.jsonl --device cuda

Greedy, batched (data/kd.py through model/runner.py). The output is append-only JSONL, one line per answered
instruction, written as each batch finishes: a run that stops can be started again with the same
command and skips the ids already done. Every line records the model (path + weights fingerprint,
data/kd.model_identity), so KD answers from another model are refused by train/transllm.py and
by a resumed run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.flags import Flags, at_least, flag, parse
from data.kd import generate_kd, model_identity, pending
from data.readers import DataError
from model import assets
from model.chat import TEMPLATES, get_template
from model.checkpoint import load
from model.generate import Sampling
from model.runner import Runner


def _default_instructions() -> str:
    try:
        return str(assets.shared_dir() / "data" / "instruct" / "alpaca_en_demo.jsonl")
    except FileNotFoundError:
        return ""


@dataclass
class KDArgs(Flags):
    """Recovery-KD data for TransLLM: the frozen ORIGINAL chat model answers English instructions."""
    out: str = flag(help="KD .jsonl (appended to; resumable)")
    model: str | None = flag(None, "the ORIGINAL chat model: HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    instructions: str = flag(factory=_default_instructions, help="English instructions .jsonl {instruction, input?, id?}")
    limit: int = flag(0, "first N instructions only (0 = all)", rule=at_least(0))
    max_new_tokens: int = flag(256, "answer budget", rule=at_least(1))
    batch_size: int = flag(8, "answers generated together", rule=at_least(1))
    template: str | None = flag(None, "chat template (default: recognised from the stored one)", choices=TEMPLATES)
    system: str | None = flag(None, "system prompt (default: the model's own; llama2: 'You are a helpful assistant.')")
    dtype: str = flag("float32", "weights dtype", choices=("float32", "bfloat16", "float16"))
    device: str | None = flag(None, "torch device (default: cuda when present)")
    progress: bool = flag(True, "progress bar")


def parse_args(argv=None) -> KDArgs:
    return parse(KDArgs, argv, prog="generate_kd.py", description=__doc__)


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = args.model or str(assets.smollm2_gguf())
    identity = model_identity(path)
    out = Path(args.out)
    try:
        rows, already = pending(args.instructions, out, identity, args.limit)
    except DataError as err:
        raise SystemExit(f"error: {err}")
    print(f"{already} answers already in {out}; {len(rows)} to generate with {path}", flush=True)
    if not rows:
        return {"new": 0, "done": already, "out": str(out)}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(path, dtype=getattr(torch, args.dtype), device=device)
    template = get_template(tokenizer, args.template, args.system)
    t0 = time.perf_counter()
    runner = Runner(model, tokenizer, template, Sampling(max_new_tokens=args.max_new_tokens), args.batch_size)
    tokens = generate_kd(runner, rows, out, identity, progress=args.progress)
    dt = time.perf_counter() - t0
    print(f"wrote {len(rows)} answers ({tokens} tokens, {tokens / dt:,.1f} tokens/s) to {out}", flush=True)
    return {"new": len(rows), "done": already + len(rows), "tokens": tokens, "out": str(out)}


if __name__ == "__main__":
    main()
