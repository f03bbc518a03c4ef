"""Fused linear + cross-entropy: loss from hidden states without the full [N, V] logits.

The vocabulary projection of N tokens materialises N*V floats (8k tokens x 128k vocab = 4 GiB in
fp32). Processing tokens in chunks keeps only chunk*V logits alive at once.

triton (Liger-style): for each chunk of tokens, logits = h @ W^T (a torch matmul); one Triton
program per row computes the row's loss and overwrites the logits *in place* with their gradient;
then grad_h[chunk] = dlogits @ W and grad_W += dlogits^T @ h. All gradients are computed during
forward, so peak memory is one [chunk, V] buffer and backward only scales by grad_output. The
price: grad_h [N,D] and an fp32 grad_W [V,D] live from this forward to its backward (2 GiB for
a 128k x 4096 vocabulary), where the recomputing reference allocates them only in backward.

reference: chunk_size <= 0 is the plain definition (all logits, autograd); chunk_size > 0 is
ChunkedLinearCrossEntropy, plain PyTorch that recomputes each chunk's logits in backward.

Backward: for a token with target y and logits z, loss = logsumexp(z) - z_y, so
  d loss / d z = softmax(z) - onehot(y);  the mean over n_valid tokens divides by n_valid,
and ignored tokens (target == ignore_index) contribute neither loss nor gradient. With z = h W^T:
  d/dh = dz W,   d/dW = dz^T h   (summed over chunks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import check_device, tl, triton


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, chunk_size: int = 0) -> torch.Tensor:
    """hidden[N,D], weight[V,D], targets[N] -> fp32 scalar: summed CE over non-ignored tokens / their count.

    chunk_size <= 0 (or >= N) materialises all N*V logits and lets autograd differentiate: the
    plain definition. chunk_size > 0 runs ChunkedLinearCrossEntropy, which holds at most
    chunk_size*V logits at a time in forward *and* backward.
    """
    if chunk_size <= 0 or chunk_size >= hidden.shape[0]:
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        logits = hidden @ weight.t()
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum") / n_valid
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_size)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Plain-PyTorch chunked linear + CE whose backward recomputes each chunk's logits.

    Why not a loop of F.cross_entropy calls under autograd: autograd would keep every chunk's
    logits (and softmax) alive until backward, i.e. all N*V of them again. Here forward keeps only
    the per-token logsumexp (N floats); backward recomputes one chunk of logits at a time and
    turns it into (softmax - onehot) in place. Costs one extra [c,D]x[D,V] matmul per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int):
        N = hidden.shape[0]
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        safe_targets = targets.masked_fill(~valid, 0)  # any index: its row is masked out below
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.t()).float()  # [c, V], rounded like the unchunked path
            z_target = logits.gather(1, safe_targets[rows, None]).squeeze(1)
            # logsumexp written out in place: torch.logsumexp would hold a second [c, V] buffer.
            row_max = logits.amax(dim=-1, keepdim=True)
            lse[rows] = row_max.squeeze(1) + logits.sub_(row_max).exp_().sum(dim=-1).log()
            total += ((lse[rows] - z_target) * valid[rows]).sum()
            del logits
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse, n_valid)
        ctx.chunk_size = chunk_size
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe_targets, valid, lse, n_valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator across chunks: a bf16 one would round once per chunk.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        scale = grad_out / n_valid
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            dz = (h @ weight.t()).float()
            dz.sub_(lse[rows, None]).exp_()  # softmax
            dz.scatter_add_(1, safe_targets[rows, None], -torch.ones_like(lse[rows, None]))  # - onehot
            dz.mul_((valid[rows] * scale)[:, None])  # mean over loss tokens; ignored rows -> 0
            dz = dz.to(hidden.dtype)
            if need_h:
                torch.mm(dz, weight, out=grad_h[rows])
            if need_w:
                grad_w += dz.t() @ h  # a matmul in the inputs' dtype, as autograd's would be
            del dz
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


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


def _block_v(V: int, device: torch.device) -> int:
    # Big blocks amortise the loop on GPU; the interpreter pays per op, so the same holds there.
    return min(triton.next_power_of_2(V), 32768 if device.type == "cuda" else 4096)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked fused projection + cross-entropy; gradients for hidden and weight, computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int = -100, chunk_size: int = 4096,
                block_v: int | None = None, grad_enabled: bool = True):
        check_device(hidden, weight, targets)
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                             f"{tuple(weight.shape)} must be [N, D] and [V, D]")
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"linear_cross_entropy: targets shape {tuple(targets.shape)} != [N={hidden.shape[0]}]")
        N, _ = hidden.shape
        V = weight.shape[0]
        # needs_input_grad stays True under torch.no_grad(); grad_enabled says whether a backward
        # can follow (passed in, since autograd disables grad mode inside forward).
        need_h = ctx.needs_input_grad[0] and grad_enabled
        need_w = ctx.needs_input_grad[1] and grad_enabled
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum().clamp(min=1)  # a tensor: no host sync
        chunk = N if chunk_size <= 0 else min(chunk_size, N)
        block = block_v or _block_v(V, hidden.device)
        warps = 16 if block >= 16384 else 8 if block >= 4096 else 4
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator across chunks: bf16 would round once per chunk.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for start in range(0, N, max(chunk, 1)):
            h = hidden[start:start + chunk]
            logits = h @ weight.t()  # [c, V], becomes dlogits in place below
            _ce_loss_and_grad[(h.shape[0],)](logits, logits.stride(0), targets[start:start + chunk],
                                             loss_rows[start:start + chunk], n_valid, V, ignore_index,
                                             BLOCK_V=block, num_warps=warps)
            if need_h:
                torch.mm(logits, weight, out=grad_h[start:start + chunk])
            if need_w:
                if grad_w.dtype == logits.dtype:
                    grad_w.addmm_(logits.t(), h)
                else:
                    grad_w += logits.t() @ h
            del logits
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
                                ignore_index: int = -100, chunk_size: int = 4096,
                                block_v: int | None = None) -> torch.Tensor:
    """hidden[N,D], weight[V,D], targets[N] -> fp32 scalar mean CE over non-ignored tokens.

    chunk_size tokens at a time (<= 0: all at once); block_v: vocab tile of the kernel (tests).
    """
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_size, block_v,
                                            torch.is_grad_enabled())
