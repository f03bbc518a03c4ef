"""Causal attention with grouped-query heads, packed documents and key padding.

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
Packed documents (segments, T == S): the kernels get each token's document run [lo, hi) (see
kernels/torch_attention.py) and mask keys outside it. Because documents are contiguous runs, a query
block needs only the keys from its first row's document start to its last row's document end:
the loops start and stop there, so a block of short documents skips almost every key block (and
the dk/dv kernel skips the query blocks of other documents the same way).
Key padding (key_mask[B,S]): masked per key. A row with no visible key at all gets O = 0 and
L = +inf, so its P = exp(s - L) is 0 in backward: zero gradients, no NaN.
Scores use exp2 with log2(e) folded into the scale (the stored L is in that base too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kernels._triton import check_device, interpreting, tl, triton
from kernels.torch_attention import check_masks, document_bounds

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128  # the largest head dim whose tiles tests/test_kernels_compile.py checks


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
def _visible(rows, cols, T, S, doc_lo, doc_hi, key_ok,
             CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """[rows, cols] bool: key col is visible to query row (in range, causal, same document, not padding).

    doc_lo/doc_hi: [rows] document runs (HAS_SEGMENTS); key_ok: [cols] bool (HAS_KEY_MASK).
    """
    ok = (rows[:, None] < T) & (cols[None, :] < S)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (S - T))
    if HAS_SEGMENTS:
        ok = ok & (cols[None, :] >= doc_lo[:, None]) & (cols[None, :] < doc_hi[:, None])
    if HAS_KEY_MASK:
        ok = ok & key_ok[None, :]
    return ok


@triton.jit
def _document_runs(DOC_LO, DOC_HI, b, s_doc, rows, rows_ok, HAS_SEGMENTS: tl.constexpr):
    """[rows] -> (lo, hi): each row's document run (unused placeholders without segments)."""
    lo = rows
    hi = rows
    if HAS_SEGMENTS:
        lo = tl.load(DOC_LO + b * s_doc + rows, mask=rows_ok, other=0)
        hi = tl.load(DOC_HI + b * s_doc + rows, mask=rows_ok, other=0)
    return lo, hi


@triton.jit
def _query_block_keys(start_m, T, S, doc_lo, doc_hi, row_ok,
                      CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """[lo, hi): the key range a query block can see (lo a multiple of BLOCK_N)."""
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M + (S - T))
    if HAS_SEGMENTS:
        # Runs are contiguous: the first row's document starts first, the last row's ends last.
        lo = (tl.min(tl.where(row_ok, doc_lo, S), axis=0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.max(tl.where(row_ok, doc_hi, 0), axis=0))
    return lo, hi


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, DOC_LO, DOC_HI, KEY_MASK,
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, s_doc, s_km,
              H, GROUPS, T, S, HEAD_DIM, qk_scale,
              CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    row_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok, other=0.0)
    doc_lo, doc_hi = _document_runs(DOC_LO, DOC_HI, b, s_doc, offs_m, row_ok, HAS_SEGMENTS)
    lo, hi = _query_block_keys(start_m, T, S, doc_lo, doc_hi, row_ok, CAUSAL, HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < S
        if HAS_KEY_MASK:
            key_ok = tl.load(KEY_MASK + b * s_km + cols, mask=cols < S, other=0) != 0
        k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :] * skd, mask=(cols[:, None] < S) & d_ok,
                    other=0.0)
        s = _dot(q, tl.trans(k), None, PRECISION, DOT_F32) * qk_scale
        ok = _visible(offs_m, cols, T, S, doc_lo, doc_hi, key_ok, CAUSAL, HAS_SEGMENTS, HAS_KEY_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps m = -inf: shift by 0 instead, so that
        # exp2(-inf - -inf) never makes a NaN (its p and alpha are then exp2(-inf) = 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :] * svd, mask=(cols[:, None] < S) & d_ok,
                    other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, PRECISION, DOT_F32)
        m_i = m_new
    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    # No visible key: L = +inf, so backward's P = exp2(s - L) is 0 for the row.
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


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
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_LO, DOC_HI, KEY_MASK,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd, s_doc, s_km,
                   H, HKV, GROUPS, T, S, HEAD_DIM, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    col_ok = offs_n < S
    n_ok = col_ok[:, None]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=n_ok & d_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=n_ok & d_ok, other=0.0)
    key_ok = col_ok
    if HAS_KEY_MASK:
        key_ok = tl.load(KEY_MASK + b * s_km + offs_n, mask=col_ok, other=0) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    hi = T
    if CAUSAL:
        # The first query that sees key n is t = n - (S - T); start at its query block.
        lo = (tl.maximum(start_n * BLOCK_N - (S - T), 0) // BLOCK_M) * BLOCK_M
    if HAS_SEGMENTS:
        # T == S: the keys' own runs say which queries share their documents.
        key_lo = tl.load(DOC_LO + b * s_doc + offs_n, mask=col_ok, other=S)
        key_hi = tl.load(DOC_HI + b * s_doc + offs_n, mask=col_ok, other=0)
        lo = tl.maximum(lo, (tl.min(key_lo, axis=0) // BLOCK_M) * BLOCK_M)
        hi = tl.max(key_hi, axis=0)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row_base = (b * H + h) * T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < T
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=m_ok[:, None] & d_ok,
                         other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            doc_lo, doc_hi = _document_runs(DOC_LO, DOC_HI, b, s_doc, offs_m, m_ok, HAS_SEGMENTS)
            s = _dot(q, tl.trans(k), None, PRECISION, DOT_F32) * qk_scale  # [BLOCK_M, BLOCK_N]
            ok = _visible(offs_m, offs_n, T, S, doc_lo, doc_hi, key_ok, CAUSAL, HAS_SEGMENTS, HAS_KEY_MASK)
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
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DOC_LO, DOC_HI, KEY_MASK,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                 sdqb, sdqh, sdqt, sdqd, s_doc, s_km,
                 H, GROUPS, T, S, HEAD_DIM, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    doc_lo, doc_hi = _document_runs(DOC_LO, DOC_HI, b, s_doc, offs_m, m_ok, HAS_SEGMENTS)
    lo, hi = _query_block_keys(start_m, T, S, doc_lo, doc_hi, m_ok, CAUSAL, HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n[:, None] < S
        key_ok = offs_n < S
        if HAS_KEY_MASK:
            key_ok = tl.load(KEY_MASK + b * s_km + offs_n, mask=offs_n < S, other=0) != 0
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=n_ok & d_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=n_ok & d_ok, other=0.0)
        s = _dot(q, tl.trans(k), None, PRECISION, DOT_F32) * qk_scale
        ok = _visible(offs_m, offs_n, T, S, doc_lo, doc_hi, key_ok, CAUSAL, HAS_SEGMENTS, HAS_KEY_MASK)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), None, PRECISION, DOT_F32)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION, DOT_F32)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok)


@dataclass(frozen=True)
class Tile:
    """One kernel's launch shape: BLOCK_M queries x BLOCK_N keys, warps, pipeline stages."""
    m: int
    n: int
    warps: int = 4
    stages: int = 1

    def launch(self) -> dict:
        return dict(BLOCK_M=self.m, BLOCK_N=self.n, num_warps=self.warps, num_stages=self.stages)


@dataclass(frozen=True)
class Tiles:
    """The tiles of the forward, dk/dv and dq kernels."""
    fwd: Tile
    dkdv: Tile
    dq: Tile


def choose_tiles(hd: int, dtype: torch.dtype, T: int, gpu: bool,
                 block_m: int | None = None, block_n: int | None = None) -> Tiles:
    """The tiles for head dim hd, input dtype and T queries, on a GPU or in the interpreter.

    GPU values start from the Triton tutorial's choices for hd 64/128 and were cut down until
    tests/test_kernels_compile.py found every kernel within sm_80's and sm_90's shared memory
    with no register spill (this kernel's masks hold more registers than the tutorial's); they
    are not yet timed (see kernels/BENCHMARKS.md). fp32 dots are exact FMA loops rather than
    tensor-core MMAs and keep their operands in registers, hence much smaller tiles. Decoding
    (T <= 16 queries) gets a 16-row query tile instead of wasting most of a 128-row one. The
    interpreter gets 16x16 tiles, cheap there and exercising the partial-block paths.
    block_m/block_n override every kernel's tile sizes (tests).
    """
    if not gpu:
        tile = Tile(block_m or 16, block_n or 16, 1, 1)
        return Tiles(tile, tile, tile)
    if dtype == torch.float32:
        tiles = _FP32_TILES_HD64 if hd <= 64 else _FP32_TILES_HD128
    else:
        tiles = _TILES_HD64 if hd <= 64 else _TILES_HD128
    if T <= 16:
        tiles = replace(tiles, fwd=_DECODE_FP32 if dtype == torch.float32 else _DECODE)
    if block_m or block_n:
        tiles = Tiles(*(replace(t, m=block_m or t.m, n=block_n or t.n) for t in (tiles.fwd, tiles.dkdv, tiles.dq)))
    return tiles


# Checked by tests/test_kernels_compile.py (registers / shared memory per block on sm_80 and sm_90
# are listed in kernels/BENCHMARKS.md). The dk/dv kernel keeps its key tile's k, v, dk and dv in
# registers: at hd 64 a 64-key tile already spilled on sm_80, whatever the warps, hence 32 keys;
# the 128-query dq tile spilled 4 B on sm_80 with key_mask alone (not with segments + key_mask).
_TILES_HD64 = Tiles(fwd=Tile(128, 64, 8, 3), dkdv=Tile(64, 32, 4, 2), dq=Tile(64, 32, 4, 3))
_TILES_HD128 = Tiles(fwd=Tile(128, 64, 8, 3), dkdv=Tile(32, 64, 8, 3), dq=Tile(64, 32, 8, 3))
# fp32: ptxas's register allocation of the FMA dots jumps between configurations (a 32x32 tile
# compiled at 138 registers on sm_80 and spilled 568 B on sm_90): these passed on both.
_FP32_TILES_HD64 = Tiles(fwd=Tile(16, 32, 4, 1), dkdv=Tile(16, 32, 8, 1), dq=Tile(32, 32, 8, 1))
_FP32_TILES_HD128 = Tiles(fwd=Tile(16, 32, 4, 1), dkdv=Tile(16, 32, 4, 1), dq=Tile(16, 32, 4, 1))
_DECODE = Tile(16, 64, 4, 3)
_DECODE_FP32 = Tile(16, 32, 8, 1)


def _precision(dtype: torch.dtype, dot_f32: bool) -> str:
    # fp32 inputs: exact fp32 dots (no tf32), so fp32 results match the reference closely.
    return "ieee" if dtype == torch.float32 or dot_f32 else "tf32"


def _mask_args(doc, key_mask, placeholder):
    """(DOC_LO, DOC_HI, KEY_MASK, s_doc, s_km): absent masks get a placeholder pointer the kernel never reads."""
    lo, hi = doc if doc is not None else (placeholder, placeholder)
    km = key_mask if key_mask is not None else placeholder
    return lo, hi, km, lo.stride(0) if doc is not None else 0, km.stride(0) if key_mask is not None else 0


def _forward(q, k, v, causal: bool, doc, key_mask, tiles: Tiles, dot_f32: bool):
    """Launch the forward kernel: -> (o [B,H,T,hd] in q's layout, lse fp32 [B,H,T])."""
    B, H, T, hd = q.shape
    HKV, S = k.shape[1], k.shape[2]
    o = torch.empty_like(q)  # keeps q's layout: [B,T,H,hd] storage makes the o_proj reshape free
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if B * H * T:
        lo, hi, km, s_doc, s_km = _mask_args(doc, key_mask, lse)
        grid = (triton.cdiv(T, tiles.fwd.m), B * H)
        _attn_fwd[grid](q, k, v, o, lse, lo, hi, km, *q.stride(), *k.stride(), *v.stride(), *o.stride(), s_doc, s_km,
                        H, H // HKV, T, S, hd, _LOG2E / math.sqrt(hd), CAUSAL=causal, HAS_SEGMENTS=doc is not None,
                        HAS_KEY_MASK=key_mask is not None, BLOCK_D=_block_d(hd),
                        PRECISION=_precision(q.dtype, dot_f32), DOT_F32=dot_f32, **tiles.fwd.launch())
    return o, lse


def _backward(q, k, v, o, lse, do, causal: bool, doc, key_mask, tiles: Tiles, dot_f32: bool):
    """Launch the three backward kernels: -> (dq, dk, dv)."""
    B, H, T, hd = q.shape
    HKV, S = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H * T == 0:
        return dq, dk.zero_(), dv.zero_()
    sm_scale = 1.0 / math.sqrt(hd)
    flags = dict(CAUSAL=causal, HAS_SEGMENTS=doc is not None, HAS_KEY_MASK=key_mask is not None,
                 BLOCK_D=_block_d(hd), PRECISION=_precision(q.dtype, dot_f32), DOT_F32=dot_f32)
    lo, hi, km, s_doc, s_km = _mask_args(doc, key_mask, lse)
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(T, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, T, hd,
                                                  BLOCK_M=64, BLOCK_D=_block_d(hd), num_warps=4)
    _attn_bwd_dkdv[(triton.cdiv(S, tiles.dkdv.n), B * HKV)](
        q, k, v, do, lse, delta, dk, dv, lo, hi, km, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride(), *dv.stride(), s_doc, s_km, H, HKV, H // HKV, T, S, hd, sm_scale * _LOG2E, sm_scale,
        **tiles.dkdv.launch(), **flags)
    _attn_bwd_dq[(triton.cdiv(T, tiles.dq.m), B * H)](
        q, k, v, do, lse, delta, dq, lo, hi, km, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        s_doc, s_km, H, H // HKV, T, S, hd, sm_scale * _LOG2E, sm_scale,
        **tiles.dq.launch(), **flags)
    return dq, dk, dv


def _block_d(hd: int) -> int:
    return max(triton.next_power_of_2(hd), 16)


def _check_inputs(q, k, v, causal: bool) -> None:
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
    if hd > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {hd} > {MAX_HEAD_DIM}: no tile config is checked for it "
                         "(use the torch path: LANGSHIFT_KERNELS=torch)")


class FlashAttentionFunction(torch.autograd.Function):
    """Triton GQA attention (causal or not, optional documents and key padding); gradients for q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool = True, segments=None, key_mask=None,
                block_m: int | None = None, block_n: int | None = None):
        check_device(q, k, v)
        _check_inputs(q, k, v, causal)
        check_masks(q, k, segments, key_mask)
        doc = document_bounds(segments) if segments is not None else None
        km = key_mask.contiguous().view(torch.uint8) if key_mask is not None else None
        tiles = choose_tiles(q.shape[-1], q.dtype, q.shape[2], q.is_cuda, block_m, block_n)
        ctx.dot_f32 = interpreting()  # see _dot
        o, lse = _forward(q, k, v, causal, doc, km, tiles, ctx.dot_f32)
        ctx.save_for_backward(q, k, v, o, lse, *(doc or ()), *((km,) if km is not None else ()))
        ctx.causal, ctx.tiles, ctx.has_doc, ctx.has_km = causal, tiles, doc is not None, km is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *masks = ctx.saved_tensors
        doc = (masks[0], masks[1]) if ctx.has_doc else None
        km = masks[-1] if ctx.has_km else None
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.causal, doc, km, ctx.tiles, ctx.dot_f32)
        return dq, dk, dv, None, None, None, None, None


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                           block_m: int | None = None, block_n: int | None = None,
                           segments: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q[B,Hq,T,hd], k/v[B,Hkv,S,hd] -> [B,Hq,T,hd], the math of attention_reference.

    segments[B,T] int (T == S): document ids, a token sees only its own document's run (see
    kernels/torch_attention.py); key_mask[B,S] bool: False = padded key. block_m/block_n override the
    query/key tile sizes of every kernel (tests use them to cover partial and unequal tiles).
    """
    return FlashAttentionFunction.apply(q, k, v, causal, segments, key_mask, block_m, block_n)
