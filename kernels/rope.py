"""Rotary position embedding in the HF "rotate-half" layout.

A head vector x of size hd is split into halves (x1, x2); position p rotates each pair
(x1[i], x2[i]) by angle p * inv_freq[i]:  out = x * cos + rotate_half(x) * sin, where
rotate_half(x) = (-x2, x1) and cos/sin[p] = cos/sin(p * inv_freq) repeated twice along hd.

triton: one program per (batch, position) rotates every q head and every k head of that token,
reading cos/sin once; outputs are new tensors (q/k are never written in place).

Backward: with c = (c1, c2), s = (s1, s2) the two halves of cos and sin,
  o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2
is linear in x, so dx = J^T do:
  dx1 = do1 c1 + do2 s2,   dx2 = do2 c2 - do1 s1
i.e. the same kernel rotating the other way (a rotation's transpose is its inverse when c1 = c2,
s1 = s2). cos/sin are position tables, not learned: they get no gradient.
"""
from __future__ import annotations

import torch

from kernels._triton import check_device, tl, triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) along the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q[B,Hq,T,hd], k[B,Hkv,T,hd], cos/sin[B,T,hd] (or [T,hd]) -> rotated (q, k), new tensors.

    Inputs are never modified in place (the KV cache and autograd both keep references to them).
    """
    if cos.dim() == 3:  # per-batch positions (left-padded batches): broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@triton.jit
def _rotate_heads(X, OUT, b, t, sxb, sxh, sxt, sxd, sob, soh, sot, sod, H, HALF,
                  c1, c2, s1, s2, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (d < HALF)
    x_ptr = X + b * sxb + t * sxt + heads * sxh
    o_ptr = OUT + b * sob + t * sot + heads * soh
    x1 = tl.load(x_ptr + d * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + (d + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_ptr + d * sod, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + (d + HALF) * sod, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                 sqob, sqoh, sqot, sqod, skob, skoh, skot, skod,
                 scb, sct, scd, ssb, sst, ssd,
                 T, HQ, HKV, HALF,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < HALF
    cos_ptr = COS + b * scb + t * sct
    sin_ptr = SIN + b * ssb + t * sst
    # The reference casts cos/sin to q's dtype before multiplying: round the same way.
    c1 = tl.load(cos_ptr + d * scd, mask=dmask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    c2 = tl.load(cos_ptr + (d + HALF) * scd, mask=dmask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    s1 = tl.load(sin_ptr + d * ssd, mask=dmask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    s2 = tl.load(sin_ptr + (d + HALF) * ssd, mask=dmask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    _rotate_heads(Q, QO, b, t, sqb, sqh, sqt, sqd, sqob, sqoh, sqot, sqod, HQ, HALF, c1, c2, s1, s2,
                  BACKWARD, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, b, t, skb, skh, skt, skd, skob, skoh, skot, skod, HKV, HALF, c1, c2, s1, s2,
                  BACKWARD, BLOCK_HKV, BLOCK_HALF)


def _table_strides(table: torch.Tensor, B: int, T: int, hd: int, name: str):
    """Strides (batch, position, dim) of a cos/sin table [B,T,hd], [1,T,hd] or [T,hd] (batch stride 0)."""
    if table.dim() == 2:
        table = table.unsqueeze(0)
    if table.dim() != 3 or table.shape[1:] != (T, hd) or table.shape[0] not in (1, B):
        raise ValueError(f"apply_rope: {name} shape {tuple(table.shape)} does not match [B={B}, T={T}, hd={hd}] "
                         f"or [T, hd]")
    sb = 0 if table.shape[0] == 1 else table.stride(0)
    return sb, table.stride(1), table.stride(2)


def _rope_launch(q, k, cos, sin, backward: bool):
    B, HQ, T, hd = q.shape
    HKV = k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (T, hd):
        raise ValueError(f"apply_rope: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if hd % 2:
        raise ValueError(f"apply_rope: head dim {hd} must be even for rotate-half")
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if B * T == 0:
        return qo, ko
    half = hd // 2
    warps = 4 if (HQ + HKV) * hd <= 8192 else 8
    _rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
                           *_table_strides(cos, B, T, hd, "cos"), *_table_strides(sin, B, T, hd, "sin"),
                           T, HQ, HKV, half, BACKWARD=backward, BLOCK_HQ=triton.next_power_of_2(HQ),
                           BLOCK_HKV=triton.next_power_of_2(HKV), BLOCK_HALF=triton.next_power_of_2(half),
                           num_warps=warps)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """Triton rotary embedding of q and k together; gradients for q and k (none for cos/sin)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        check_device(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # If only q or only k was used, autograd passes zeros for the other (materialize_grads).
        dq_in, dk_in = _rope_launch(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Same contract as apply_rope_reference: new rotated (q, k); inputs untouched."""
    return RoPEFunction.apply(q, k, cos, sin)
