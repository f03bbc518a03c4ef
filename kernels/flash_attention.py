"""Causal attention with grouped-query heads.

reference: the math written out (softmax(q k^T / sqrt(d) + mask) v); k/v heads are shared by
groups of q heads, expanded here by repeat_interleave (the Triton kernel indexes them instead).

triton (FlashAttention-2 structure, as in the Triton fused-attention tutorial):
  forward:  one program per (block of queries, batch, q head) streams the key/value blocks it may
            see, keeping a running max m, running sum l and unnormalised output (online softmax),
            and stores O = acc / l and the row's logsumexp L = m + log l. The [T, S] score matrix
            is never stored. A q head reads k/v head (q head // group size): no repeated k/v.
  backward: P is recomputed from q, k and the stored L (P = exp(s - L)), so nothing else is saved.
            With s = q k^T * scale, O = P v, dO given:
              dv = P^T dO
              dP = dO v^T
              dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id   (softmax Jacobian)
              dq = scale * dS k,      dk = scale * dS^T q
            One kernel owns a block of keys of one k/v head and loops over every q head of its
            group and every query block, accumulating dk and dv in registers (no atomics, no
            repeated k/v); a second kernel owns a block of queries and accumulates dq.
Causal convention: query t of T (the last T of S positions) sees keys 0..S-T+t, so T == S is
ordinary causal training and T < S is decoding with a cache. T > S with causal=True would leave
queries with no key at all and is refused by the Triton path.
Scores use exp2 with log2(e) folded into the scale (the stored L is in that base too).
"""
from __future__ import annotations

import math

import torch

from kernels._triton import check_device, interpreting, tl, triton

_LOG2E = 1.4426950408889634


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


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b (+ acc) with fp32 accumulation.

    DOT_F32 upcasts the operands first. Only the CPU interpreter needs it: its tl.dot multiplies
    bf16 tiles as raw uint16 bit patterns (triton 3.9). Upcasting bf16 values is exact, and a GPU
    bf16 MMA also forms exact products summed in fp32, so the numbers do not change.
    """
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
              H, GROUPS, T, S, HEAD_DIM, qk_scale,
              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUPS
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < T) & d_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = S - T  # query t sees keys <= t + shift
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M + shift)
    # Key block 0 is visible to every query, so m_i is finite after the first iteration and
    # fully masked blocks later on contribute exp2(-inf) = 0 without NaN.
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :] * skd, mask=(cols[:, None] < S) & d_ok,
                    other=0.0)
        s = _dot(q, tl.trans(k), None, PRECISION, DOT_F32) * qk_scale
        ok = cols[None, :] < S
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + shift)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :] * svd, mask=(cols[:, None] < S) & d_ok,
                    other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, PRECISION, DOT_F32)
        m_i = m_new
    acc = acc / l_i[:, None]
    row_ok = offs_m < T
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sod, sdb, sdh, sdt, sdd, H, T, HEAD_DIM,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta_i = sum_d dO_id * O_id  (= sum_j P_ij dP_ij), one fp32 value per query row.
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd,
                   H, HKV, GROUPS, T, S, HEAD_DIM, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    n_ok = offs_n[:, None] < S
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=n_ok & d_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=n_ok & d_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    shift = S - T
    lo = 0
    if CAUSAL:
        # The first query that sees key n is t = n - shift; start at its query block.
        lo = (tl.maximum(start_n * BLOCK_N - shift, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row_base = (b * H + h) * T
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < T
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=m_ok[:, None] & d_ok,
                         other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            s = _dot(q, tl.trans(k), None, PRECISION, DOT_F32) * qk_scale  # [BLOCK_M, BLOCK_N]
            ok = m_ok[:, None] & (offs_n[None, :] < S)
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv = _dot(tl.trans(p.to(do.dtype)), do, dv, PRECISION, DOT_F32)
            dp = _dot(do, tl.trans(v), None, PRECISION, DOT_F32)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, PRECISION, DOT_F32)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty),
             mask=n_ok & d_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty),
             mask=n_ok & d_ok)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                 sdqb, sdqh, sdqt, sdqd,
                 H, GROUPS, T, S, HEAD_DIM, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUPS
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    m_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok,
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=m_ok[:, None] & d_ok,
                 other=0.0)
    row_base = bh.to(tl.int64) * T
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = S - T
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M + shift)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n[:, None] < S
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=n_ok & d_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=n_ok & d_ok, other=0.0)
        s = _dot(q, tl.trans(k), None, PRECISION, DOT_F32) * qk_scale
        ok = m_ok[:, None] & (offs_n[None, :] < S)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), None, PRECISION, DOT_F32)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION, DOT_F32)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok)


def _config(q: torch.Tensor, block_m: int | None, block_n: int | None):
    """(fwd BLOCK_M, BLOCK_N, bwd dkdv BLOCK_M/N, bwd dq BLOCK_M/N, warps, stages).

    GPU values follow the Triton tutorial's choices for hd 64/128 (not yet tuned on this code:
    see kernels/BENCHMARKS.md); the interpreter gets small tiles, which are cheap there and
    exercise the partial-block paths.
    """
    hd = q.shape[-1]
    if not q.is_cuda:
        tiles = (block_m or 16, block_n or 16)
        return tiles, tiles, tiles, 1, 1
    fwd = (block_m or 128, block_n or 64)
    dkdv = (block_m or 32, block_n or (128 if hd <= 64 else 64))
    dq = (block_m or (128 if hd <= 64 else 64), block_n or 32)
    warps = 4 if hd <= 64 else 8
    return fwd, dkdv, dq, warps, 3


class FlashAttentionFunction(torch.autograd.Function):
    """Triton causal/non-causal GQA attention; gradients for q, k and v."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool = True, block_m: int | None = None, block_n: int | None = None):
        check_device(q, k, v)
        B, H, T, hd = q.shape
        HKV, S = k.shape[1], k.shape[2]
        if k.shape != (B, HKV, S, hd) or v.shape != k.shape:
            raise ValueError(f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                             "[B,Hq,T,hd], [B,Hkv,S,hd], [B,Hkv,S,hd]")
        if H % HKV:
            raise ValueError(f"flash_attention: {H} q heads is not a multiple of {HKV} k/v heads")
        if causal and T > S:
            raise ValueError(f"flash_attention: causal with T={T} queries > S={S} keys leaves queries without keys")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"flash_attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
        fwd, dkdv, dq_blocks, warps, stages = _config(q, block_m, block_n)
        o = torch.empty_like(q)  # keeps q's layout: [B,T,H,hd] storage makes the o_proj reshape free
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        sm_scale = 1.0 / math.sqrt(hd)
        # fp32 inputs: exact fp32 dots (no tf32), so fp32 results match the reference closely.
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        ctx.dot_f32 = interpreting()  # see _dot
        if ctx.dot_f32:
            precision = "ieee"
        block_d = max(triton.next_power_of_2(hd), 16)
        if B * H * T:
            grid = (triton.cdiv(T, fwd[0]), B * H)
            _attn_fwd[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                            H, H // HKV, T, S, hd, sm_scale * _LOG2E, CAUSAL=causal, BLOCK_M=fwd[0],
                            BLOCK_N=fwd[1], BLOCK_D=block_d, PRECISION=precision, DOT_F32=ctx.dot_f32,
                            num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale, ctx.precision, ctx.block_d = causal, sm_scale, precision, block_d
        ctx.blocks, ctx.warps, ctx.stages = (dkdv, dq_blocks), warps, stages
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, hd = q.shape
        HKV, S = k.shape[1], k.shape[2]
        (dkdv, dq_blocks), warps, stages = ctx.blocks, ctx.warps, ctx.stages
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if B * H * T == 0:
            return dq, dk.zero_(), dv.zero_(), None, None, None
        delta = torch.empty_like(lse)
        _attn_bwd_delta[(triton.cdiv(T, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, T, hd,
                                                      BLOCK_M=64, BLOCK_D=ctx.block_d, num_warps=4)
        qk_scale = ctx.sm_scale * _LOG2E
        _attn_bwd_dkdv[(triton.cdiv(S, dkdv[1]), B * HKV)](
            q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dk.stride(), *dv.stride(), H, HKV, H // HKV, T, S, hd, qk_scale, ctx.sm_scale,
            CAUSAL=ctx.causal, BLOCK_M=dkdv[0], BLOCK_N=dkdv[1], BLOCK_D=ctx.block_d, PRECISION=ctx.precision,
            DOT_F32=ctx.dot_f32, num_warps=warps, num_stages=stages)
        _attn_bwd_dq[(triton.cdiv(T, dq_blocks[0]), B * H)](
            q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, H // HKV, T, S, hd, qk_scale, ctx.sm_scale,
            CAUSAL=ctx.causal, BLOCK_M=dq_blocks[0], BLOCK_N=dq_blocks[1], BLOCK_D=ctx.block_d,
            PRECISION=ctx.precision, DOT_F32=ctx.dot_f32, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None, None


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                           block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """q[B,Hq,T,hd], k/v[B,Hkv,S,hd] -> [B,Hq,T,hd], same math as attention_reference (no mask).

    block_m/block_n override the query/key tile sizes of every kernel (tests use them to cover
    partial and unequal tiles).
    """
    return FlashAttentionFunction.apply(q, k, v, causal, block_m, block_n)
