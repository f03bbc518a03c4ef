"""Recovery knowledge distillation (TransLLM): English instructions answered by the ORIGINAL chat
model, kept as a resumable .jsonl file.

One line per answer: {id, instruction, input, output, model: {path, fingerprint}, max_new_tokens,
truncated}. The model's identity (path + a fingerprint of its weight files) is on every line, so
answers from another model are refused: recovering *this* model's knowledge needs *its* answers.
Generation appends; `pending` says what is still to do, so an interrupted run continues.

    identity = model_identity(path)
    rows, done = pending(instructions_jsonl, out, identity, limit)
    generate_kd(Runner(model, tokenizer, template, Sampling(max_new_tokens=256)), rows, out, identity)
    read_kd(out, expect=identity)  -> rows (every line checked against the expected model)
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from data.readers import DataError, read_jsonl
from model.runner import Runner


def _file_digest(path: Path, chunks: int = 16, chunk: int = 1 << 16) -> str:
    """sha256 over the size and `chunks` evenly spaced 64 KiB slices: every tensor region of a
    multi-GB file is sampled, in milliseconds, without reading it all."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(chunks):
            f.seek(max(0, (size - chunk) * k // max(chunks - 1, 1)))
            h.update(f.read(chunk))
    return h.hexdigest()


def model_identity(path: str | os.PathLike) -> dict:
    """{'path', 'fingerprint'} of an HF folder (weights + config) or a .gguf file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"model path {path} does not exist")
    if not files:
        raise DataError(f"{path}: no weight files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + _file_digest(f).encode())
    return {"path": str(path.resolve()), "fingerprint": h.hexdigest()[:24]}


def instruction_id(record: dict) -> str:
    """A stable id for an instruction record: its own 'id', else a hash of instruction + input."""
    if record.get("id") is not None:
        return str(record["id"])
    text = f"{record.get('instruction', '')}\n{record.get('input', '')}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_kd(path: str | os.PathLike, expect: dict | None = None) -> list[dict]:
    """Rows of a recovery-KD file; expect: model_identity(original model) -> every row must carry
    the same fingerprint, else DataError naming the two models."""
    path, rows = Path(path), []
    for number, row in read_jsonl(path):
        for key in ("id", "instruction", "output", "model"):
            if key not in row:
                raise DataError(f"{path}:{number}: KD row without {key!r}: not a recovery-KD file (data/kd.py)")
        got = (row["model"] or {}).get("fingerprint")
        if expect is not None and got != expect["fingerprint"]:
            raise DataError(f"{path}:{number}: KD answers come from another model ({row['model'].get('path')}, "
                            f"fingerprint {got}) than {expect['path']} ({expect['fingerprint']}); "
                            "regenerate them with scripts/generate_kd.py --model " + expect["path"])
        rows.append(row)
    return rows



def kd_query(row: dict) -> str:
    """The English user message of a KD row (instruction + input, as data.readers joins them)."""
    extra = (row.get("input") or "").strip()
    return f"{row['instruction'].strip()}\n\n{extra}" if extra else row["instruction"].strip()


def pending(instructions: str | os.PathLike, out: Path, identity: dict, limit: int = 0) -> tuple[list[dict], int]:
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


def generate_kd(runner: Runner, rows: list[dict], out: Path, identity: dict, progress: bool = True) -> int:
    """Answer rows with `runner` (greedy, batched), appending one JSON line per answer after each
    batch; returns the number of new tokens generated. Rows are answered shortest prompt first,
    so each batch wastes little on padding."""
    conversations = {r["id"]: [{"role": "user", "content": kd_query(r)}] for r in rows}
    rows = sorted(rows, key=lambda r: len(runner.render(conversations[r["id"]])))
    out.parent.mkdir(parents=True, exist_ok=True)
    total, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(rows), desc="recovery KD", unit="answer", disable=not progress, dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(rows), runner.batch_size):
            batch = rows[start:start + runner.batch_size]
            answers = runner.results([conversations[r["id"]] for r in batch])
            for row, a in zip(batch, answers):
                f.write(json.dumps({**row, "output": a.text, "model": identity, "max_new_tokens": runner.max_new_tokens,
                                    "truncated": not a.stopped}, ensure_ascii=False) + "\n")
            f.flush()
            total += sum(len(a.ids) for a in answers)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{total / (time.perf_counter() - t0):,.1f}")
    bar.close()
    return total
