"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight.

reference: plain PyTorch, the definition every other implementation is tested against.
triton:    one program normalises one row in a single read of x; the backward recomputes
           x_hat from the saved per-row rstd and writes dx and per-program partial sums of dw.

Backward (per row, D = row length, r = rstd = (mean(x^2) + eps)^-1/2, x_hat = x * r, g = dy * w):
  y_i = w_i * x_hat_i                      -> dw_i = sum over rows of dy_i * x_hat_i
  d r / d x_j = -r^3 x_j / D
  dx_j = sum_i g_i (r delta_ij + x_i d r/d x_j) = r * (g_j - x_hat_j * mean_i(g_i * x_hat_i))
The cast of x_hat to x's dtype before the weight multiply (HF semantics) is rounding only: its
gradient is taken as identity, as autograd does for `.to(dtype)`.
"""
from __future__ import annotations

import torch

from kernels._triton import check_device, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x[..., D], weight[D] -> [..., D] in x's dtype.

    The statistics are taken in fp32 and the result is cast back before the weight multiply,
    exactly as HF LlamaRMSNorm does, so bf16 outputs match it bit for bit.
    """
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    # Round x_hat to x's dtype before the weight multiply, as the reference does.
    x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * x_hat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, D, rows_per_program,
                  BLOCK_D: tl.constexpr):
    # Each program walks a contiguous run of rows and keeps its share of dw in registers, so dw
    # costs one [n_programs, D] fp32 buffer instead of an atomic add per row.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # 64-bit row pointers, advanced one row per step (row * stride can pass 2^31 elements).
    dy_ptr = DY + row_start * stride_dy
    x_ptr = X + row_start * stride_x
    dx_ptr = DX + row_start * stride_dx
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / D))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dy_ptr += stride_dy
        x_ptr += stride_x
        dx_ptr += stride_dx
    tl.store(DW_PART + pid.to(tl.int64) * D + cols, dw, mask=mask)


MAX_DIM = 8192  # one block holds a whole row; 16384 spilled registers in backward (tests/test_kernels_compile.py)


def _launch_config(D: int):
    """(BLOCK_D, num_warps) for rows of D elements: one block holds a whole row."""
    block = triton.next_power_of_2(D)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, warps


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float):
    """Launch the forward kernel on rows x2[n, D]: -> (y [n, D], rstd fp32 [n])."""
    n, D = x2.shape
    y = torch.empty((n, D), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x2.device)
    block, warps = _launch_config(D)
    if n:
        _rms_norm_fwd[(n,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps, BLOCK_D=block, num_warps=warps)
    return y, rstd


def _backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Launch the backward kernel: -> (dx [n, D], dw fp32 [D])."""
    n, D = x2.shape
    dx = torch.empty_like(x2)
    if x2.is_cuda:
        programs = min(n, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
    else:
        programs = min(n, 4)
    programs = max(programs, 1)
    rows_per_program = triton.cdiv(n, programs)
    programs = triton.cdiv(n, rows_per_program) if n else 1
    dw_part = torch.zeros((programs, D), dtype=torch.float32, device=x2.device)
    block, warps = _launch_config(D)
    if n:
        _rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0),
                                   dx.stride(0), n, D, rows_per_program, BLOCK_D=block, num_warps=warps)
    return dx, dw_part.sum(0)


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm with gradients for x and weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        check_device(x, weight)
        D = x.shape[-1]
        if weight.shape != (D,):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x[..., {D}]")
        if D > MAX_DIM:
            raise ValueError(f"rms_norm: rows of {D} > {MAX_DIM} elements have no checked Triton config "
                             "(use the torch path: LANGSHIFT_KERNELS=torch)")
        x2 = x.reshape(-1, D)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw = _backward(dy2, x2, weight, rstd)
        return dx.view(ctx.x_shape), dw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x[..., D], weight[D] -> [..., D]; same semantics as rms_norm_reference."""
    return RMSNormFunction.apply(x, weight, eps)

