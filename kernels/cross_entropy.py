"""Fused linear + cross-entropy: loss from hidden states without the full [N, V] logits.

The vocabulary projection of N tokens materialises N*V floats (8k tokens x 128k vocab = 4 GiB in
fp32). Processing tokens in chunks keeps only chunk*V logits alive at once.

triton (Liger-style): for each chunk of tokens, logits = h @ W^T (a torch matmul); one Triton
program per row computes the row's loss and overwrites the logits *in place* with their gradient;
then grad_h[chunk] = dlogits @ W and grad_W += dlogits^T @ h. All gradients are computed during
forward, so peak memory is one [chunk, V] buffer, no logits are recomputed, and backward only
scales by grad_output. grad_h [N,D] and an fp32 grad_W [V,D] (when the head trains) live from
this forward to its backward, which comes next: the loss is the last op of forward.

reference: chunk_size <= 0 is the plain definition (all logits, autograd); chunk_size > 0 runs
the very same chunk loop (`LinearCrossEntropyFunction`) with the row step written in torch ops
instead of the Triton kernel: the path of CPU training.

Backward: for a token with target y and logits z, loss = logsumexp(z) - z_y, so
  d loss / d z = softmax(z) - onehot(y);  the mean over n_valid tokens divides by n_valid,
and ignored tokens (target == ignore_index) contribute neither loss nor gradient. With z = h W^T:
  d/dh = dz W,   d/dW = dz^T h   (summed over chunks).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels._triton import check_device, tl, triton

IGNORE_INDEX = -100  # the target of a token without loss (PyTorch's convention): import it from here


# Default tokens per chunk: one chunk's fp32 logits are CHUNK_TOKENS x V x 4 bytes (96 MiB for
# SmolLM2's 49152 pieces, 250 MiB for LLaMA-3's 128256). Measured on a 2-core CPU (1024 tokens,
# V=49152, D=576, forward+backward): 4096 (one chunk) 0.93 s, 512 0.93 s, 256 1.05 s: 512 costs
# no time and holds 8x fewer logits than one chunk of 4096 tokens.
CHUNK_TOKENS = 512


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, chunk_size: int = 0) -> torch.Tensor:
    """hidden[N,D], weight[V,D], targets[N] -> fp32 scalar: summed CE over non-ignored tokens / their count.

    chunk_size <= 0 materialises all N*V logits and lets autograd differentiate: the plain
    definition. chunk_size > 0 holds one [chunk, V] logits buffer at a time (one chunk of all N
    tokens when chunk_size >= N), gradients computed in forward by `_rows_torch`.
    """
    if chunk_size <= 0:
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        logits = hidden @ weight.t()
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum") / n_valid
    rows_fn = _rows_torch
    if hidden.dtype != torch.float32:  # one fp32 buffer for every chunk's softmax, allocated once
        rows_fn = functools.partial(_rows_torch, work=hidden.new_empty(min(chunk_size, len(hidden)), len(weight),
                                                                       dtype=torch.float32))
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_size, rows_fn,
                                            torch.is_grad_enabled())


def _rows_torch(logits, targets, loss_rows, n_valid, ignore_index: int, need_grad: bool, work=None):
    """One chunk in torch ops: logits[c,V] -> loss_rows[c] (written), and dlogits[c,V] =
    (softmax - onehot) / n_valid in logits' dtype, written over logits (None when no gradient is
    needed). work: an fp32 buffer of at least [c, V] for bf16/fp16 logits; None for fp32 logits,
    which are worked on in place.

    Why not F.cross_entropy under autograd: autograd would keep every chunk's logits and softmax
    alive until backward, i.e. all N*V of them again. Here one fp32 buffer turns into exp, then
    softmax, then the gradient, in place (torch.softmax / logsumexp would hold a second one).
    """
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)[:, None]  # any index: its row is masked out below
    z = logits if work is None else work[:len(logits)].copy_(logits)  # [c, V] fp32
    z_target = z.gather(1, safe).squeeze(1)
    row_max = z.amax(dim=-1, keepdim=True)
    sum_exp = z.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
    loss_rows.copy_(((row_max + sum_exp.log()).squeeze(1) - z_target) * valid)
    if not need_grad:
        return None
    z.div_(sum_exp).scatter_add_(1, safe, -torch.ones_like(sum_exp))  # softmax - onehot
    z.mul_((valid / n_valid)[:, None])                                 # ignored rows -> 0
    return z if z is logits else logits.copy_(z)


@triton.jit
def _ce_loss_and_grad(LOGITS, stride_row, TARGETS, LOSS, N_VALID, V, ignore_index, BLOCK_V: tl.constexpr):
    # One row: pass 1 finds max and sum of exp online over vocab blocks (and the target's logit),
    # pass 2 overwrites the logits with (softmax - onehot) / n_valid.
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    z_target = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_target += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
    lse = m + tl.log(s)
    scale = tl.where(valid, 1.0 / tl.load(N_VALID).to(tl.float32), 0.0)
    tl.store(LOSS + row, tl.where(valid, lse - z_target, 0.0))
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _launch_config(V: int, device: torch.device):
    """(BLOCK_V, num_warps) for rows of V logits."""
    # Big blocks amortise the loop; on GPU 8192 is the largest that compiled without register
    # spills for bf16, fp16 and fp32 on sm_80 and sm_90 (tests/test_kernels_compile.py). The
    # interpreter pays per op, so big blocks help there too.
    block = min(triton.next_power_of_2(V), 8192 if device.type == "cuda" else 4096)
    return block, 16 if block >= 16384 else 8 if block >= 4096 else 4


def _launch_rows(logits, targets, loss_rows, n_valid, ignore_index: int, block: int, warps: int):
    """Launch the row kernel on logits[c, V] (overwritten by their gradient) -> logits."""
    _ce_loss_and_grad[(logits.shape[0],)](logits, logits.stride(0), targets, loss_rows, n_valid, logits.shape[1],
                                          ignore_index, BLOCK_V=block, num_warps=warps)
    return logits


def _rows_triton(logits, targets, loss_rows, n_valid, ignore_index: int, need_grad: bool, block_v=None):
    """One chunk through the kernel: loss_rows written, logits overwritten by their gradient
    (always computed: it costs the kernel one extra pass over the row it already has in cache)."""
    check_device(logits, targets)
    block, warps = _launch_config(logits.shape[1], logits.device)
    if block_v:
        block, warps = block_v, 16 if block_v >= 16384 else 8 if block_v >= 4096 else 4
    return _launch_rows(logits, targets, loss_rows, n_valid, ignore_index, block, warps)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked projection + cross-entropy, gradients for hidden and weight computed in forward.

    rows_fn(logits[c,V], targets[c], loss_rows[c], n_valid, ignore_index, need_grad) does one
    chunk: _rows_triton (the fused kernel) or _rows_torch (its plain-PyTorch twin).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int, rows_fn, grad_enabled: bool):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                             f"{tuple(weight.shape)} must be [N, D] and [V, D]")
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"linear_cross_entropy: targets shape {tuple(targets.shape)} != [N={hidden.shape[0]}]")
        N = hidden.shape[0]
        # needs_input_grad stays True under torch.no_grad(); grad_enabled says whether a backward
        # can follow (passed in, since autograd disables grad mode inside forward).
        need_h = ctx.needs_input_grad[0] and grad_enabled
        need_w = ctx.needs_input_grad[1] and grad_enabled
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum().clamp(min=1)  # a tensor: no host sync
        chunk = N if chunk_size <= 0 else min(chunk_size, N)
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator across chunks: bf16 would round once per chunk.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
        # One logits buffer for every chunk: a fresh [chunk, V] tensor per chunk is a fresh
        # allocation that large, which on a CPU means page faults on every chunk (~0.1 s for
        # 512 x 49152 fp32 on the 2-core EPYC), as costly as the chunk's softmax.
        buffer = hidden.new_empty(min(chunk, N), weight.shape[0]) if N else None
        for start in range(0, N, max(chunk, 1)):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            logits = torch.mm(h, weight.t(), out=buffer[:len(h)])
            dz = rows_fn(logits, targets[rows], loss_rows[rows], n_valid, ignore_index, need_h or need_w)
            if need_h:
                torch.mm(dz, weight, out=grad_h[rows])
            if need_w:
                if grad_w.dtype == dz.dtype:
                    grad_w.addmm_(dz.t(), h)
                else:
                    grad_w += dz.t() @ h
            del dz
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # Out of place: a second backward (retain_graph) must see the same saved gradients.
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = IGNORE_INDEX, chunk_size: int = CHUNK_TOKENS,
                                block_v: int | None = None) -> torch.Tensor:
    """hidden[N,D], weight[V,D], targets[N] -> fp32 scalar mean CE over non-ignored tokens.

    chunk_size tokens at a time (<= 0: all at once); block_v: vocab tile of the kernel (tests).
    """
    rows_fn = functools.partial(_rows_triton, block_v=block_v)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_size, rows_fn,
                                            torch.is_grad_enabled())
