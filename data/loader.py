"""Packed blocks and a distributed, deterministic, resumable batch loader.

    ds = PackedDataset("runs/tokens/", seq_len=512)          # len(ds) = number of blocks
    loader = BatchLoader(ds, micro_batch_size=8, rank=r, world_size=W, seed=0)
    batch = loader.next_batch()  # tokens, labels, positions, segments: int64 [B, T]
    state = loader.state_dict(); ...; loader.load_state_dict(state)

The loader reads the data as an endless sequence of epochs, each a permutation of the blocks
(seeded with seed + epoch, so every process computes the same one without talking to the
others). Global step g takes the next B*W entries of that sequence; rank r takes entries
[g*B*W + r*B, g*B*W + (r+1)*B). A global batch may straddle an epoch edge: nothing is dropped,
every block is seen once per epoch. The only state is the step counter, so resuming from
state_dict() yields exactly the batches an uninterrupted run would have, with no replay.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from data.packing import block_arrays, block_bounds
from data.tokenfile import TokenFile

KEYS = ("tokens", "labels", "positions", "segments")


def default_packing(fmt: str | None) -> str:
    """Text formats are cut as a stream; chat formats keep each conversation whole."""
    return "stream" if fmt in (None, "inscp", "orgcp") else "whole"


class PackedDataset:
    """Fixed-length blocks of a token file (or of in-memory samples, see from_samples).

    ds[i] -> {"tokens", "labels", "positions", "segments"}: int64 tensors [seq_len] (labels are
    already shifted; see data/packing.py). pack: "stream" | "whole" | None (by the file's format).
    """

    def __init__(self, source: str | Path | TokenFile, seq_len: int, pack: str | None = None,
                 pad_id: int | None = None, tokenizer=None):
        tf = source if isinstance(source, TokenFile) else TokenFile(source)
        if tokenizer is not None:
            tf.check_tokenizer(tokenizer)
        self.meta = tf.meta
        self._init(tf.tokens, tf.mask, tf.offsets, seq_len, pack or default_packing(tf.meta.get("format")),
                   pad_id if pad_id is not None else _meta_pad(tf.meta))

    @classmethod
    def from_samples(cls, samples: list[tuple[list[int], list[bool]]], seq_len: int, pack: str = "stream",
                     pad_id: int = 0) -> "PackedDataset":
        """The same blocks from in-memory samples [(ids, loss_mask)], for tests and small runs."""
        self = cls.__new__(cls)
        samples = [(ids, mask) for ids, mask in samples if len(ids)]
        lengths = [len(ids) for ids, _ in samples]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.array([t for ids, _ in samples for t in ids], dtype=np.int64)
        mask = np.array([bool(m) for _, ms in samples for m in ms], dtype=bool)
        self.meta = {"n_tokens": int(offsets[-1]), "n_docs": len(samples), "format": None}
        self._init(tokens, mask, offsets, seq_len, pack, pad_id)
        return self

    @property
    def source_id(self) -> str | None:
        """A short digest of what the blocks were made from (the token file's input files by size
        and sha256, its token and sample counts, the block length); None for in-memory samples.
        A resumed loader refuses a state saved over other data."""
        if not self.meta.get("sources"):
            return None
        key = [self.meta["sources"], self.meta["n_tokens"], self.meta["n_docs"], self.seq_len, self.pack]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _init(self, tokens, mask, offsets, seq_len, pack, pad_id):
        self.tokens, self.mask, self.offsets = tokens, mask, np.asarray(offsets, dtype=np.int64)
        self.seq_len, self.pack, self.pad_id = int(seq_len), pack, int(pad_id)
        self.bounds = block_bounds(self.offsets, self.seq_len, pack)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range [0, {len(self)})")
        arrays = block_arrays(self.tokens, self.mask, self.offsets, int(self.bounds[i]), int(self.bounds[i + 1]),
                              self.seq_len, self.pad_id)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _meta_pad(meta: dict) -> int:
    # Padding is never attended to by real tokens and never a target, so any valid id will do;
    # the tokenizer's pad (or eos) keeps the batch readable when decoded.
    tok = meta.get("tokenizer") or {}
    for key in ("pad_id", "eos_id"):
        if tok.get(key) is not None:
            return int(tok[key])
    return 0


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[{key: [T]}] -> {key: [B, T]}."""
    return {k: torch.stack([it[k] for it in items]) for k in KEYS}


class BatchLoader:
    """Micro-batches of one rank: dict of int64 [micro_batch_size, seq_len] tensors.

    len(loader): global steps (= this rank's micro-batches) per epoch, rounded up.
    tokens_per_epoch: block tokens (padding included) in one epoch over all ranks.
    """

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if len(dataset) == 0:
            raise ValueError("the dataset has no blocks: it holds no tokens")
        self.dataset, self.batch, self.rank, self.world = dataset, int(micro_batch_size), rank, world_size
        self.seed, self.shuffle = int(seed), shuffle
        self.step = 0  # global steps taken: the whole cursor
        self._perm_epoch, self._perm = None, None

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.global_batch)

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.dataset) * self.dataset.seq_len

    @property
    def epoch(self) -> int:
        """Epoch of the first block of the next global batch."""
        return self.step * self.global_batch // len(self.dataset)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                # torch's CPU generator: the same permutation on every machine for a given seed
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(n, generator=g).numpy()
            else:
                self._perm = np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        """Block indices of this rank's micro-batch at global step `step`."""
        n, first = len(self.dataset), step * self.global_batch + self.rank * self.batch
        return [int(self._permutation(p // n)[p % n]) for p in range(first, first + self.batch)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch; advances the global step."""
        batch = collate([self.dataset[i] for i in self.indices(self.step)])
        self.step += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
                "blocks_consumed": self.step * self.global_batch, "n_blocks": len(self.dataset),
                "micro_batch_size": self.batch, "world_size": self.world, "data": self.dataset.source_id}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped. The data must be the same (same number of blocks, seed,
        shuffle); B*W may change if the blocks consumed so far are a whole number of new steps."""
        if state.get("data") != self.dataset.source_id and None not in (state.get("data"), self.dataset.source_id):
            raise ValueError(f"the training data changed since this state was saved (data {state['data']} -> "
                             f"{self.dataset.source_id}: a data file was edited, or other files or settings are "
                             "given); resume with the same data, or start a new run")
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("n_blocks", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {mine!r}: "
                                 "resume with the same data and seed")
        consumed = state.get("blocks_consumed", state["step"] * self.global_batch)
        if consumed % self.global_batch:
            raise ValueError(f"cannot resume: {consumed} blocks consumed is not a whole number of global "
                             f"batches of {self.global_batch} (micro batch x world size changed)")
        self.step = consumed // self.global_batch
