"""Recovery-KD data for TransLLM: the frozen ORIGINAL chat model answers English instructions.

    python scripts/generate_kd.py --instructions ../shared/data/instruct/alpaca_en_demo.jsonl \\
        --out runs/kd/smollm2.jsonl --limit 64 --max-new-tokens 256
    python scripts/generate_kd.py --model path/to/llama-2-7b-chat --out kd.jsonl --device cuda

Greedy, batched (model/generate.py). The output is append-only JSONL, one line per answered
instruction, written as each batch finishes: a run that stops can be started again with the same
command and skips the ids already done. Every line records the model (path + weights fingerprint,
data/tcot.model_identity), so KD answers from another model are refused by train/transllm.py and
by a resumed run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from data.readers import DataError, read_jsonl  # noqa: E402
from data.tcot import instruction_id, kd_query, model_identity  # noqa: E402


def pending(instructions: str, out: Path, identity: dict, limit: int = 0) -> tuple[list[dict], int]:
    """Instruction rows not yet answered in `out` -> (rows to do, number already done).
    Refuses an existing `out` written by another model."""
    done = set()
    if out.exists() and out.stat().st_size:
        for number, row in read_jsonl(out):
            fp = (row.get("model") or {}).get("fingerprint")
            if fp != identity["fingerprint"]:
                raise DataError(f"{out}:{number}: written by another model ({(row.get('model') or {}).get('path')}, "
                                f"fingerprint {fp}); choose a new --out for {identity['path']}")
            done.add(str(row["id"]))
    todo, seen = [], set()
    for number, row in read_jsonl(instructions):
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise DataError(f"{instructions}:{number}: no 'instruction' string")
        rid = instruction_id(row)
        if rid in seen:
            continue
        seen.add(rid)
        if limit and len(seen) > limit:
            break
        if rid not in done:
            todo.append({"id": rid, "instruction": row["instruction"], "input": row.get("input") or ""})
    return todo, len(done & seen)


def generate_kd(model, tokenizer, template, rows: list[dict], out: Path, identity: dict, max_new_tokens: int = 256,
                batch_size: int = 8, progress: bool = True) -> int:
    """Answer rows greedily in batches, appending one JSON line per answer; returns the number of
    new tokens generated. Prompts are sorted by length so a batch wastes little on left padding."""
    from tqdm import tqdm

    from model.generate import Sampling, generate
    stop = [i for i in template.stop_ids if i is not None]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop)
    pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    room = model.config.max_seq_len - max_new_tokens
    prompts = [template.render([{"role": "user", "content": kd_query(r)}], add_generation_prompt=True)[-room:]
               for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    out.parent.mkdir(parents=True, exist_ok=True)
    total, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(rows), desc="recovery KD", unit="answer", disable=not progress, dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            new = generate(model, [prompts[i] for i in batch], sampling, pad_id=pad)
            for i, ids in zip(batch, new):
                answer = tokenizer.decode(ids).rstrip("\ufffd").strip()
                f.write(json.dumps({**rows[i], "output": answer, "model": identity,
                                    "max_new_tokens": max_new_tokens, "truncated": len(ids) >= max_new_tokens},
                                   ensure_ascii=False) + "\n")
            f.flush()
            total += sum(len(ids) for ids in new)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{total / (time.perf_counter() - t0):,.1f}")
    bar.close()
    return total


def parse_args(argv=None):
    from model.assets import shared_dir
    default = ""
    try:
        default = str(shared_dir() / "data" / "instruct" / "alpaca_en_demo.jsonl")
    except FileNotFoundError:
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the ORIGINAL chat model: HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--instructions", default=default, help="English instructions .jsonl {instruction, input?, id?}")
    p.add_argument("--out", required=True, help="KD .jsonl (appended to; resumable)")
    p.add_argument("--limit", type=int, default=0, help="first N instructions only (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--template", choices=["llama2", "llama3", "chatml"], help="default: detected")
    p.add_argument("--system", help="system prompt (default: the model's own; llama2: 'You are a helpful assistant.')")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    from model import assets
    from model.chat import get_template
    from model.checkpoint import load
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
    tokens = generate_kd(model, tokenizer, template, rows, out, identity, args.max_new_tokens, args.batch_size,
                         progress=not args.no_progress)
    dt = time.perf_counter() - t0
    print(f"wrote {len(rows)} answers ({tokens} tokens, {tokens / dt:,.1f} tokens/s) to {out}", flush=True)
    return {"new": len(rows), "done": already + len(rows), "tokens": tokens, "out": str(out)}


if __name__ == "__main__":
    main()
