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

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402

from data.kd import generate_kd, model_identity, pending  # noqa: E402
from data.readers import DataError  # noqa: E402
from model import assets  # noqa: E402
from model.chat import TEMPLATES, get_template  # noqa: E402
from model.checkpoint import load  # noqa: E402
from model.generate import Sampling  # noqa: E402
from model.runner import Runner  # noqa: E402


def parse_args(argv=None):
    default = ""
    try:
        default = str(assets.shared_dir() / "data" / "instruct" / "alpaca_en_demo.jsonl")
    except FileNotFoundError:
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the ORIGINAL chat model: HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--instructions", default=default, help="English instructions .jsonl {instruction, input?, id?}")
    p.add_argument("--out", required=True, help="KD .jsonl (appended to; resumable)")
    p.add_argument("--limit", type=int, default=0, help="first N instructions only (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--template", choices=list(TEMPLATES), help="default: recognised from the stored chat template")
    p.add_argument("--system", help="system prompt (default: the model's own; llama2: 'You are a helpful assistant.')")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


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
    tokens = generate_kd(runner, rows, out, identity, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    print(f"wrote {len(rows)} answers ({tokens} tokens, {tokens / dt:,.1f} tokens/s) to {out}", flush=True)
    return {"new": len(rows), "done": already + len(rows), "tokens": tokens, "out": str(out)}


if __name__ == "__main__":
    main()
