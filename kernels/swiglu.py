"""SwiGLU gate of the LLaMA MLP: silu(gate) * up (the down projection stays a plain matmul).

triton: one elementwise pass reading gate and up once and writing the product; the backward
recomputes sigmoid(gate) instead of saving silu(gate), so nothing beyond the inputs is kept.
torch (every other device): the same saving in plain torch ops (SwiGLURecompute): autograd of
silu(gate) * up keeps gate, silu(gate) and up; this keeps gate and up and recomputes silu(gate)
in backward (one more elementwise pass; for SmolLM2's 4 x 256-token step, 180 MB less).

Backward, with s = sigmoid(g), silu(g) = g s, and d s/d g = s (1 - s):
  d out/d up   = silu(g)                       -> d_up   = d_out * g * s
  d out/d gate = up * (s + g s (1 - s))        -> d_gate = d_out * up * s * (1 + g (1 - s))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import check_device, tl, triton

_BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate[..., F], up[..., F] -> silu(gate) * up, [..., F]."""
    return F.silu(gate) * up


class SwiGLURecompute(torch.autograd.Function):
    """swiglu_reference saving only its inputs. Its backward runs the very ops autograd would
    (the product's rule, then silu's own backward), so the numbers are the reference's bits."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dgate = torch.ops.aten.silu_backward(dout * up, gate) if ctx.needs_input_grad[0] else None
        dup = dout * F.silu(gate) if ctx.needs_input_grad[1] else None
        return dgate, dup


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate[..., F], up[..., F] -> silu(gate) * up, keeping only gate and up for backward."""
    if not (gate.requires_grad or up.requires_grad) or not torch.is_grad_enabled():
        return swiglu_reference(gate, up)  # inference: no graph to keep, nothing to save
    return SwiGLURecompute.apply(gate, up)


@triton.jit
def _swiglu_fwd(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    # F.silu returns gate's dtype before the multiply: round there too.
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (silu * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DOUT, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + offs, (dout * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dout * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on contiguous gate/up: -> silu(gate) * up."""
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


def _backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Launch the backward kernel on contiguous tensors: -> (dgate, dup)."""
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=_BLOCK, num_warps=4)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """Triton silu(gate) * up with gradients for gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        check_device(gate, up)
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
        gate_c, up_c = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate_c, up_c)
        return _forward(gate_c, up_c)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _backward(dout.contiguous(), gate, up)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate[..., F], up[..., F] -> silu(gate) * up; same semantics as swiglu_reference."""
    return SwiGLUFunction.apply(gate, up)
