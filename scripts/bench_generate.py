"""Benchmark: our batched generation vs transformers `generate`, same weights, same prompts.

    python scripts/bench_generate.py                       # SmolLM2-135M-Instruct, 4 prompts, 64 new tokens
    python scripts/bench_generate.py --batch 8 --new-tokens 128 --device cuda --dtype bfloat16

The model is loaded once by us (GGUF or HF folder), written as an HF folder, and each side loads
that folder. Each side runs in its own child process so that its peak memory is its own, measured from after
loading to the end of generation: on CUDA torch.cuda.max_memory_allocated, on CPU the peak
resident set size of the process (weights and the Python runtime included).

Both sides run pure argmax for exactly new_tokens steps: ours with no stop ids, transformers with
eos_token_id=None (no EOS stopping criterion) and no min_new_tokens (which would mask EOS out of
the argmax, so a row whose argmax is EOS would continue differently). The script then checks that
both produced the same tokens, and exits 1 naming the first differing row and step if not. It
asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402

from scripts.benchmarking import (  # noqa: E402
    best_time, hf_copy, peak_memory_mib, reset_peak_memory, run_side, weight_bytes_per_step)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "請用繁體中文介紹台北。",
    "อธิบายการสังเคราะห์แสงสั้น ๆ",
    "Give three tips for learning a new language.",
    "Explain what a KV cache is in one paragraph.",
    "List the planets of the solar system.",
    "Why is the sky blue?",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (after one warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def chat_prompts(folder, batch: int) -> tuple[list[list[int]], int]:
    """The first `batch` PROMPTS (cycled) as chat prompt ids of the folder's template, and the pad id."""
    from model.chat import get_template
    from model.checkpoint import load_tokenizer_only
    tokenizer = load_tokenizer_only(folder)
    template = get_template(tokenizer)
    prompts = [template.render([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True)
               for i in range(batch)]
    return prompts, tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def side_main(args) -> dict:
    """Child process: load the HF folder with one library, generate, report JSON on stdout."""
    dtype = getattr(torch, args.dtype)
    prompts, pad = chat_prompts(args.folder, args.batch)
    if args.side == "ours":
        from model.checkpoint import load
        from model.generate import Sampling, generate
        model, _ = load(args.folder, dtype=dtype, device=args.device)
        sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0.0, stop_ids=[])
        reset_peak_memory(args.device)
        seconds, out = best_time(lambda: generate(model, prompts, sampling, pad_id=pad), args.repeats, args.device)
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype).to(args.device).eval()
        P = max(map(len, prompts))
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=args.device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=args.device)

        model.generation_config.eos_token_id = None  # never stop early (the loaded folder names EOS)

        def hf_generate():
            with torch.inference_mode():
                full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=pad)
            if full.shape[1] != P + args.new_tokens:
                raise SystemExit(f"transformers stopped after {full.shape[1] - P} of {args.new_tokens} tokens")
            return full[:, P:].tolist()
        reset_peak_memory(args.device)
        seconds, out = best_time(hf_generate, args.repeats, args.device)
    return {"seconds": seconds, "tokens": args.batch * args.new_tokens, "peak_mib": peak_memory_mib(args.device),
            "out": out, "weight_bytes": weight_bytes_per_step(model)}


def main(argv=None):
    args = parse_args(argv)
    if args.side:
        print(json.dumps(side_main(args)))
        return
    from model import assets
    source = args.model or assets.smollm2_gguf()
    flags = ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
             "--device", args.device, "--dtype", args.dtype]
    with hf_copy(source) as folder:
        results = {side: run_side(__file__, side, folder, flags) for side in ("ours", "transformers")}
    diff = first_difference(results["ours"]["out"], results["transformers"]["out"])
    print(f"model {source}\ndevice {args.device}, {args.dtype}, batch {args.batch}, {args.new_tokens} new tokens, "
          f"best of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'side':<14}{'tokens/s':>10}{'seconds':>10}{'peak MiB':>10}")
    for side, r in results.items():
        print(f"{side:<14}{r['tokens'] / r['seconds']:>10.1f}{r['seconds']:>10.2f}{r['peak_mib']:>10.0f}")
    ours, theirs = results["ours"], results["transformers"]
    print(f"speed ratio ours/transformers: {theirs['seconds'] / ours['seconds']:.2f}x; "
          f"memory ratio: {ours['peak_mib'] / theirs['peak_mib']:.2f}; same tokens: {diff is None}")
    if diff is not None:
        row, step, a, b = diff
        sys.exit(f"tokens differ: row {row}, step {step}: ours {a}, transformers {b}")


def first_difference(ours: list[list[int]], theirs: list[list[int]]):
    """(row, step, our id, their id) of the first differing token, or None when all are equal."""
    for row, (a, b) in enumerate(zip(ours, theirs)):
        for step, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return row, step, x, y
        if len(a) != len(b):
            return row, min(len(a), len(b)), None, None
    return None


if __name__ == "__main__":
    main()
