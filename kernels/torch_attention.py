"""Masked attention on the torch path, and the masks every path agrees on.

Two masks besides causality:
  segments[B,T] (training on packed blocks, T == S): document ids of the tokens. A document is a
      maximal run of equal ids (data/packing.py writes increasing ids, one run per document), and a
      token attends only to tokens of its own run: earlier ones when causal, all of them otherwise.
  key_mask[B,S] bool (left-padded batches, decoding with a cache): False at padded keys, which no
      query may see.
Causal convention (as kernels.flash_attention): query t of T is the last T of S positions and sees
keys 0..S-T+t. A query with no allowed key at all (a padded query whose keys are all padding)
gets an all-zero output and zero gradients, on every path.

Paths here (the Triton kernel is kernels/flash_attention.py; kernels.attention picks):
  - no mask needed (no segments, no key_mask, T == S or not causal): SDPA without a mask, which
    lets PyTorch use its fused flash/efficient kernels.
  - CPU tensors with segments (packed training): one SDPA call per document, each without a
    mask (`document_attention`): the work is the sum of the squared document lengths instead of
    T^2 per row, and no [B,1,T,T] mask is built or read. On the main job's packed blocks (4 x 256
    tokens, documents of ~57 tokens) forward + backward of one layer took 28.9 ms against 41.5 ms
    for SDPA with the dense mask (`scripts/bench_kernels.py --cpu-attention`, 2-core EPYC, fp32).
    Rows of one document each get a single plain causal SDPA. bf16 documents shorter than
    CPU_FP32_BELOW tokens are attended in fp32, where torch's CPU kernel is faster on them.
    FlexAttention is not an option here: torch 2.13 refuses its backward on CPU ("FlexAttention
    does not support backward on CPU"), its eager forward is ~4x slower than SDPA with a dense
    mask, and compiling it for CPU took 45 s (B=4, H=9, T=512, hd=64).
  - CPU tensors with key_mask (padded batches, with or without segments): SDPA with a dense bool
    mask [B,1,T,S].
  - CUDA tensors with segments: FlexAttention (compiled) with a document block mask, which skips
    the key blocks outside each query block's documents and never builds a [T,S] mask.
  - CUDA tensors with only key_mask (decoding, prefill of a padded batch): SDPA with the dense mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def run_starts(segments: torch.Tensor) -> torch.Tensor:
    """segments[B,T] ids -> bool [B,T]: True at the first token of each run of equal ids."""
    starts = torch.ones(segments.shape, dtype=torch.bool, device=segments.device)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def document_bounds(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segments[B,T] ids -> (lo, hi) int32 [B,T]: token t's document is the run [lo[t], hi[t]).

    Runs, not ids: ids that repeat after another document count as a new document.
    """
    if segments.dim() != 2:
        raise ValueError(f"segments must be [B, T] document ids, got shape {tuple(segments.shape)}")
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    starts = run_starts(segments)
    ends = torch.ones_like(starts)  # last token of a run
    ends[:, :-1] = starts[:, 1:]
    lo = torch.where(starts, idx, 0).cummax(dim=1).values
    hi = torch.where(ends, idx + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def dense_mask(T: int, S: int, causal: bool, segments: torch.Tensor | None, key_mask: torch.Tensor | None,
               device) -> torch.Tensor:
    """Bool [B or 1, 1, T, S], True = may attend: causality, documents and key padding combined."""
    allowed = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(diagonal=S - T)
    allowed = allowed[None, None]
    if segments is not None:
        lo, hi = document_bounds(segments.to(device))
        cols = torch.arange(S, device=device)
        allowed = allowed & ((cols >= lo[..., None]) & (cols < hi[..., None]))[:, None]
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed


def check_masks(q: torch.Tensor, k: torch.Tensor, segments, key_mask) -> None:
    """Shapes of the masks against q[B,H,T,hd] and k[B,K,S,hd], one line naming the tensor."""
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    if segments is not None:
        if T != S:
            raise ValueError(f"attention: segments (packed documents) need T == S (no KV cache), got T={T}, S={S}")
        if segments.shape != (B, T) or segments.is_floating_point():
            raise ValueError(f"attention: segments must be integer [B={B}, T={T}], got {segments.dtype} "
                             f"{tuple(segments.shape)}")
    if key_mask is not None and (key_mask.shape != (B, S) or key_mask.dtype != torch.bool):
        raise ValueError(f"attention: key_mask must be bool [B={B}, S={S}], got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")


def sdpa_attention(q, k, v, segments=None, key_mask=None, causal: bool = True) -> torch.Tensor:
    """q[B,H,T,hd], k/v[B,K,S,hd] -> [B,H,T,hd] through F.scaled_dot_product_attention.

    Without masks (and T == S or not causal) SDPA gets no mask at all; otherwise the dense mask.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if segments is None and key_mask is None and (T == S or not causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    mask = dense_mask(T, S, causal, segments, key_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if key_mask is not None:  # rows with no key: zeros, whatever the SDPA backend does with them
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out


def document_lengths(segments: torch.Tensor) -> list[list[int]]:
    """segments[B,T] ids -> per row, the lengths of its runs in order (they sum to T). Reads
    the tensor on the host."""
    B, T = segments.shape
    rows: list[list[int]] = [[] for _ in range(B)]
    flat = run_starts(segments).reshape(-1).nonzero().view(-1).tolist() + [B * T]  # every row starts a run at 0
    for begin, end in zip(flat, flat[1:]):
        rows[begin // T].append(end - begin)
    return rows


# Below this many tokens, CPU attention in bf16 (or fp16) runs in fp32: torch 2.13's CPU flash
# kernel is slower in bf16 than in fp32 on short sequences (forward + backward of one document,
# H=9, hd=64, 2-core EPYC with AVX512-BF16: 64 tokens 1.33 ms in bf16 vs 0.58 ms through fp32,
# 256 tokens 5.6 vs 5.0 ms; from ~320 tokens on bf16 is faster: 768 tokens 21.8 vs 30.7 ms).
CPU_FP32_BELOW = 320


def _fp32_detour(q: torch.Tensor, length: int) -> bool:
    """Whether CPU attention over documents of up to `length` tokens runs in fp32 (see above)."""
    return q.device.type == "cpu" and q.dtype != torch.float32 and length < CPU_FP32_BELOW


def _sdpa_causal_or_not(q, k, v, causal: bool) -> torch.Tensor:
    """Unmasked SDPA of q[B,H,L,hd], k/v[B,K,L,hd]; short bf16/fp16 sequences on CPU in fp32."""
    gqa = q.shape[1] != k.shape[1]
    if _fp32_detour(q, q.shape[2]):
        # CPU autocast lists SDPA among its bf16 ops and would cast the fp32 inputs straight back.
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


# Data-dependent lengths: a compiled block would specialise (recompile) on every batch's lengths,
# so this runs eagerly between the compiled parts of the block.
@torch.compiler.disable
def document_attention(q, k, v, segments: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """q[B,H,T,hd], k/v[B,K,T,hd], segments[B,T] -> [B,H,T,hd]: each document attends within
    itself through one unmasked SDPA call on its slice (rows of one document each: one SDPA).

    The slices are views (split along T), so autograd's backward concatenates their gradients
    once instead of filling a zero tensor per slice. The result is built as [B,T,H,hd] and
    returned transposed, so the caller's transpose back to [B,T,H*hd] is free.
    """
    lengths = document_lengths(segments)
    if all(len(row) == 1 for row in lengths):
        return _sdpa_causal_or_not(q, k, v, causal)
    if _fp32_detour(q, max(max(row) for row in lengths)):
        # Every document takes the fp32 detour: cast the block once, not each document's slices
        # (4 casts per document forward and 4 back: ~15 documents a layer on the main job's
        # blocks, thousands of small casts per bf16 step). Autocast off: see _sdpa_causal_or_not.
        with torch.autocast("cpu", enabled=False):
            return _per_document(q.float(), k.float(), v.float(), lengths, causal).to(q.dtype)
    return _per_document(q, k, v, lengths, causal)


def _per_document(q, k, v, lengths: list[list[int]], causal: bool) -> torch.Tensor:
    """document_attention's loop: one unmasked SDPA per document (`lengths`: per row, the
    document lengths in order) -> [B,H,T,hd]."""
    rows = []
    for qb, kb, vb, lens in zip(q.unbind(0), k.unbind(0), v.unbind(0), lengths):  # [H,T,hd] each
        docs = [_sdpa_causal_or_not(qd[None], kd[None], vd[None], causal).squeeze(0)
                for qd, kd, vd in zip(qb.split(lens, 1), kb.split(lens, 1), vb.split(lens, 1))]
        rows.append(torch.cat([d.transpose(0, 1) for d in docs], 0))  # [T,H,hd]
    return torch.stack(rows).transpose(1, 2)


def single_document(segments: torch.Tensor) -> bool:
    """Whether every row of segments[B,T] is one run (reads the tensor: a host sync on CUDA)."""
    return bool((segments[:, 1:] == segments[:, :-1]).all())


_flex_compiled = None
_block_mask_cache: list = []  # [(segments, key_mask, versions, causal, shape, block mask)]: the last one


def flex_attention(q, k, v, segments, key_mask=None, causal: bool = True, compiled: bool = True) -> torch.Tensor:
    """q[B,H,T,hd], k/v[B,K,T,hd], segments[B,T] -> [B,H,T,hd] through FlexAttention.

    The mask function compares the key index with its query's document run [lo, hi). The block
    mask is built once per (segments, key_mask) pair and reused by every layer of a forward
    pass: the cache holds the tensors themselves (so their ids cannot be reused by new tensors
    while cached) and their version counters (an in-place change invalidates it).
    compiled=False runs flex eagerly: for checking the mask on CPU (forward only; torch refuses
    flex backward on CPU).
    """
    from torch.nn.attention import flex_attention as flex

    global _flex_compiled
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    versions = (segments._version, key_mask._version if key_mask is not None else 0)
    shape = (B, T, S, q.device)
    hit = [entry for entry in _block_mask_cache if entry[0] is segments and entry[1] is key_mask
           and entry[2:5] == (versions, causal, shape)]
    block_mask = hit[0][5] if hit else None
    if block_mask is None:
        lo, hi = document_bounds(segments)
        km = key_mask

        def mask_mod(b, h, qi, kv):
            ok = (kv >= lo[b, qi]) & (kv < hi[b, qi])
            if causal:
                ok = ok & (kv <= qi + (S - T))
            if km is not None:
                ok = ok & km[b, kv]
            return ok

        block_mask = flex.create_block_mask(mask_mod, B, None, T, S, device=q.device)
        _block_mask_cache[:] = [(segments, key_mask, versions, causal, shape, block_mask)]
    fn = flex.flex_attention
    if compiled:
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex.flex_attention)
        fn = _flex_compiled
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attention_torch(q, k, v, segments=None, key_mask=None, causal: bool = True) -> torch.Tensor:
    """The torch path of kernels.attention (see the module docstring for which op runs when)."""
    check_masks(q, k, segments, key_mask)
    if segments is not None and q.is_cuda:
        return flex_attention(q, k, v, segments, key_mask, causal)
    if segments is not None and key_mask is None:
        return document_attention(q, k, v, segments, causal)
    if segments is not None and single_document(segments):
        segments = None  # one document per row: no segments in the mask
    return sdpa_attention(q, k, v, segments, key_mask, causal)
