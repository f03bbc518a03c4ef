"""Causal attention with grouped-query heads.

reference: the math written out (softmax(q k^T / sqrt(d) + mask) v); k/v heads are shared by
groups of q heads, expanded here by repeat_interleave (the Triton kernel indexes them instead).
"""
from __future__ import annotations

import math

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """q[B,Hq,T,hd], k/v[B,Hkv,S,hd] -> [B,Hq,T,hd].

    causal: query t (the last T of S positions) sees keys 0..S-T+t. mask: optional bool
    [B,1,T,S] (True = may attend), combined with causal. Softmax is taken in fp32.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    T, S = q.shape[-2], k.shape[-2]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed, diagonal=S - T)
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key -> zeros
    return (probs.to(v.dtype) @ v)
