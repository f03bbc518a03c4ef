"""Perplexity filter: keep the samples the model already finds fluent (InsCP keeps PPL <= 15).

InsCP trains on low-perplexity data so that continual pre-training moves the model's language
without dragging it far from its own distribution. The filter takes any scorer
`score(ids_batch) -> mean NLL per sample`, so it is testable with a hand-made scorer; `llama_scorer`
builds the real one from a model.llama.Llama.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

Scorer = Callable[[list[list[int]]], list[float]]


def perplexity_filter(samples: Iterable[tuple[list[int], list[bool]]], score: Scorer,
                      threshold: float = 15.0, batch_size: int = 8,
                      stats: dict | None = None) -> Iterator[tuple[list[int], list[bool]]]:
    """Yield the samples whose perplexity exp(mean NLL) is <= threshold, in their order.

    score: ids of up to batch_size samples -> their mean next-token NLL (nats).
    stats: if given, filled with kept / dropped counts as the filter runs.
    """
    stats = stats if stats is not None else {}
    stats.update(kept=0, dropped=0)
    max_nll = math.log(threshold)
    batch: list = []

    def drain():
        nlls = score([ids for ids, _ in batch])
        if len(nlls) != len(batch):
            raise ValueError(f"scorer returned {len(nlls)} values for {len(batch)} samples")
        for sample, nll in zip(batch, nlls):
            keep = float(nll) <= max_nll  # NaN compares False: dropped
            stats["kept" if keep else "dropped"] += 1
            if keep:
                yield sample
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield from drain()
    if batch:
        yield from drain()


def llama_scorer(model: torch.nn.Module, pad_id: int = 0, max_len: int = 1024,
                 device: str | torch.device | None = None) -> Scorer:
    """A scorer from a causal LM: ids_batch -> mean NLL of tokens 1..n-1 of each sample.

    Samples are cut to max_len tokens (to bound memory) and right-padded: with right padding,
    causal attention alone keeps real tokens from seeing the padding, so no key mask is needed,
    and the padded positions are left out of the mean.
    """
    device = device or next(model.parameters()).device

    @torch.no_grad()
    def score(ids_batch: list[list[int]]) -> list[float]:
        cut = [ids[:max_len] for ids in ids_batch]
        T = max(len(ids) for ids in cut)
        tokens = torch.full((len(cut), T), pad_id, dtype=torch.long)
        for row, ids in enumerate(cut):
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths = torch.tensor([len(ids) for ids in cut])
        tokens = tokens.to(device)
        logits = model(tokens)[:, :-1].float()                                    # [B, T-1, V]
        nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").cpu()  # [B, T-1]
        valid = torch.arange(T - 1)[None, :] < (lengths[:, None] - 1)            # targets 1..n-1
        counts = valid.sum(1).clamp(min=1)
        # A one-token sample has no prediction: NLL 0, i.e. kept (there is nothing to judge).
        return ((nll * valid).sum(1) / counts).tolist()

    return score
