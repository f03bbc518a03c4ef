"""Token files: a tokenised corpus on disk, read back through np.memmap (nanoGPT style).

A token file is four files, in a folder (`dir/tokens.bin`, ...; the default) or beside a prefix
(`prefix.tokens.bin`, ...; write with prefix=True):
- tokens.bin   all samples' ids back to back, uint16 when every id fits (vocab <= 65536), else
               uint32: half the disk and page cache for the common vocabularies;
- mask.bin     uint8 loss mask, one byte per token (1 = the token is a training target);
- offsets.npy  int64 [n_docs + 1]: sample d is tokens[offsets[d]:offsets[d+1]];
- meta.json    dtype, n_tokens, n_docs, n_loss_tokens, format, tokenizer identity.
Samples stream to disk in chunks, so a 0.1B-token corpus is written and read without holding it
in RAM. Writing is atomic: everything goes to temporary names and is renamed into place,
meta.json last, so a crash never leaves a file that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

VERSION = 1
_PARTS = ("tokens.bin", "mask.bin", "offsets.npy", "meta.json")
# Mixed scripts and tags: two tokenizers that split this identically are, for our purposes, the
# same tokenizer (a fingerprint that needs no access to its internals).
_PROBE = "Hello, world! 你好，世界。繁體中文 สวัสดีครับ <EN> <TH> <RESPONSE> 12345 \n\t  end"


class NoSamples(ValueError):
    """Nothing to write: every input record was empty or filtered out (or split off elsewhere)."""


def token_paths(location: str | Path, prefix: bool | None = None) -> dict[str, Path]:
    """Paths of a token file's parts: `{location}/tokens.bin` and so on (a folder), or
    `{location}.tokens.bin` (prefix form). prefix=None: the prefix form if `{location}.meta.json`
    exists, else the folder form."""
    if prefix is None:
        prefix = Path(f"{location}.meta.json").is_file()
    if prefix:
        return {p: Path(f"{location}.{p}") for p in _PARTS}
    return {p: Path(location) / p for p in _PARTS}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id < vocab_size fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_identity(tokenizer) -> dict:
    """What the token file records about its tokenizer, to refuse reading it with another one."""
    probe = tokenizer.encode(_PROBE)
    return {
        "class": type(tokenizer).__name__,
        "source": str(getattr(tokenizer, "source", None) or getattr(tokenizer, "path", None) or ""),
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": getattr(tokenizer, "bos_id", None),
        "eos_id": getattr(tokenizer, "eos_id", None),
        "pad_id": getattr(tokenizer, "pad_id", None),
        "fingerprint": hashlib.sha1(json.dumps(probe).encode()).hexdigest()[:16],
    }


def write_token_file(samples: Iterable[tuple[list[int], list[bool]]], location: str | Path,
                     vocab_size: int, tokenizer: dict | None = None, fmt: str | None = None,
                     extra: dict | None = None, total: int | None = None, progress: bool = True,
                     chunk_tokens: int = 1 << 20, prefix: bool = False) -> dict:
    """Write samples (ids, loss_mask) as a token file; return its meta.

    vocab_size: bound on every id (the model's embedding rows; TransLLM's extended vocabulary
    included); it picks the dtype and an id outside it is an error, not a silent wrap-around.
    tokenizer: tokenizer_identity(...) to record. total: number of samples, for the progress bar.
    Empty samples are skipped; no samples at all is an error. prefix: write `{location}.tokens.bin`... instead of a folder.
    """
    paths = token_paths(location, prefix)
    folder = paths["tokens.bin"].parent
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = {k: p.with_name(f"{p.name}.tmp-{os.getpid()}") for k, p in paths.items()}
    dtype = token_dtype(vocab_size)
    offsets = array("q", [0])  # compact: 8 bytes a document
    buf_ids, buf_mask, n_tokens, n_loss = [], [], 0, 0

    def flush(f_tok, f_mask):
        ids = np.asarray(buf_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
            raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size}) while writing "
                             f"{paths['tokens.bin']}: pass the model's vocab_size (extended vocabulary)")
        f_tok.write(ids.astype(dtype).tobytes())
        f_mask.write(np.asarray(buf_mask, dtype=np.uint8).tobytes())
        buf_ids.clear()
        buf_mask.clear()

    try:
        with open(tmp["tokens.bin"], "wb") as f_tok, open(tmp["mask.bin"], "wb") as f_mask:
            for ids, mask in tqdm(samples, total=total, disable=not progress, unit="doc",
                                  desc=f"tokenising -> {paths['tokens.bin'].name}"):
                if len(ids) != len(mask):
                    raise ValueError(f"sample {len(offsets) - 1}: {len(ids)} ids but {len(mask)} mask entries")
                if not ids:
                    continue
                buf_ids.extend(ids)
                buf_mask.extend(mask)
                n_tokens += len(ids)
                n_loss += sum(bool(m) for m in mask)
                offsets.append(n_tokens)
                if len(buf_ids) >= chunk_tokens:
                    flush(f_tok, f_mask)
            flush(f_tok, f_mask)
        if n_tokens == 0:
            raise NoSamples(f"no samples to write to {paths['tokens.bin']}: the inputs are empty "
                            "or every sample was filtered out")
        with open(tmp["offsets.npy"], "wb") as f:
            np.save(f, np.frombuffer(offsets, dtype=np.int64))
        meta = {"version": VERSION, "dtype": dtype.name, "n_tokens": n_tokens, "n_docs": len(offsets) - 1,
                "n_loss_tokens": n_loss, "vocab_size": int(vocab_size), "format": fmt,
                "tokenizer": tokenizer, **(extra or {})}
        tmp["meta.json"].write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        for part in _PARTS:  # meta.json last: its presence marks a complete file
            os.replace(tmp[part], paths[part])
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        if created and not paths["meta.json"].exists():
            with contextlib.suppress(OSError):  # a failed write leaves no empty folder behind
                folder.rmdir()
        raise
    return meta


class TokenFile:
    """A token file opened read-only: tokens[N] and mask[N] memmaps, offsets[n_docs+1], meta."""

    def __init__(self, location: str | Path):
        self.paths = token_paths(location)
        if not self.paths["meta.json"].is_file():
            raise FileNotFoundError(f"no token file at {location}: {self.paths['meta.json']} is missing "
                                    "(write one with data.prepare)")
        self.meta = json.loads(self.paths["meta.json"].read_text())
        n, dtype = self.meta["n_tokens"], np.dtype(self.meta["dtype"])
        for part, size in (("tokens.bin", n * dtype.itemsize), ("mask.bin", n)):
            got = self.paths[part].stat().st_size if self.paths[part].exists() else None
            if got != size:
                raise ValueError(f"token file {self.paths[part]}: {got} bytes, meta.json says {size}; "
                                 "the file is damaged, write it again")
        # An empty memmap cannot be opened; a zero-token file is legal but has nothing to map.
        self.tokens = np.memmap(self.paths["tokens.bin"], dtype=dtype, mode="r") if n else np.zeros(0, dtype)
        self.mask = np.memmap(self.paths["mask.bin"], dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)
        self.offsets = np.load(self.paths["offsets.npy"])
        if len(self.offsets) != self.meta["n_docs"] + 1 or self.offsets[-1] != n:
            raise ValueError(f"token file {self.paths['offsets.npy']} does not match meta.json; write it again")

    def __len__(self) -> int:
        return self.meta["n_docs"]

    def doc(self, i: int) -> tuple[list[int], list[bool]]:
        """Sample i as (ids, loss_mask) lists."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b].astype(np.int64).tolist(), self.mask[a:b].astype(bool).tolist()

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if the file was written with a different tokenizer than `tokenizer`."""
        stored = (self.meta.get("tokenizer") or {}).get("fingerprint")
        now = tokenizer_identity(tokenizer)["fingerprint"]
        if stored is not None and stored != now:
            raise ValueError(f"token file {self.paths['meta.json']} was written with another tokenizer "
                             f"({self.meta['tokenizer']}); tokenise the data again")
