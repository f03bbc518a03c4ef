"""Packing samples into fixed-length blocks whose documents never see each other.

A block is a contiguous range [bounds[i], bounds[i+1]) of the token stream (all samples back to
back), padded to seq_len. The blocks tile the stream, so no token is dropped. Inside a block,
each document piece gets its own segment id and positions restarting at 0; the model turns the
segment ids into a block-diagonal causal mask, so a token attends only to earlier tokens of its
own document, exactly as if the document were alone in the batch.

Two ways to cut the stream:
- "stream"  every seq_len tokens (pre-training, nanoGPT style): no padding except in the very
            last block; a document crossing a block edge is split in two.
- "whole"   documents are kept whole: a document that does not fit in the current block starts
            the next one (the rest is padding). For chat data, so an answer keeps its question.
            Only a document longer than seq_len is split, into seq_len pieces.
A split piece restarts its positions at 0 (rotary attention depends only on relative positions,
so this changes nothing within the piece) and cannot see the earlier piece; the piece's first
token is not a target, since what precedes it is in another block.

Labels are shifted inside the block: labels[t] = tokens[t+1] when tokens[t+1] is a training
target of the same document piece, else IGNORE_INDEX (-100). So the last token of each document piece
and all padding carry no loss, and nothing is predicted across a document boundary.
"""
from __future__ import annotations

import numpy as np

from kernels import IGNORE_INDEX


def block_bounds(offsets: np.ndarray, seq_len: int, mode: str = "stream") -> np.ndarray:
    """Document offsets [n_docs+1] -> block bounds int64 [n_blocks+1] (see module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(offsets[-1])
    if mode == "stream":
        return np.append(np.arange(0, n, seq_len, dtype=np.int64), n) if n else np.zeros(1, np.int64)
    if mode != "whole":
        raise ValueError(f"unknown packing mode {mode!r}: choose 'stream' or 'whole'")
    bounds, start = [0], 0  # start: where the open block began
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        if b - start <= seq_len:  # the document fits in the open block
            continue
        if a > start:  # close the open block before this document
            bounds.append(a)
            start = a
        while b - start > seq_len:  # a long document: full seq_len pieces
            start += seq_len
            bounds.append(start)
    if n > start:
        bounds.append(n)
    return np.asarray(bounds, dtype=np.int64)


def block_arrays(tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, start: int, end: int,
                 seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One block [start, end) of the stream -> int64 arrays [seq_len]: tokens, labels, positions,
    segments. Padding (after end) has token pad_id, label IGNORE_INDEX, its own segment id and
    positions from 0 (so a padded query still sees itself and softmax stays finite)."""
    n = end - start
    if not 0 < n <= seq_len:
        raise ValueError(f"block [{start}, {end}) does not fit seq_len {seq_len}")
    idx = np.arange(start, end, dtype=np.int64)
    # document of each token, numbered from 0 within the block
    doc = np.searchsorted(offsets, idx, side="right") - 1
    segment = doc - doc[0]
    piece_start = np.maximum(offsets[doc], start)  # a piece split at the block start begins there
    out = {
        "tokens": np.full(seq_len, pad_id, dtype=np.int64),
        "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
        "positions": np.arange(seq_len, dtype=np.int64) - n,
        "segments": np.full(seq_len, segment[-1] + 1, dtype=np.int64),
    }
    ids = np.asarray(tokens[start:end], dtype=np.int64)
    out["tokens"][:n] = ids
    out["positions"][:n] = idx - piece_start
    out["segments"][:n] = segment
    target = np.asarray(mask[start + 1:end], dtype=bool) & (segment[1:] == segment[:-1])
    out["labels"][:n - 1] = np.where(target, ids[1:], IGNORE_INDEX)
    return out
