"""int4 weight-only quantisation of a Llama's linear layers, for CPU decoding.

Each nn.Linear weight W [N,K] is cut into groups of GROUP = 32 inputs along K (GGUF's Q4_1
layout): per group a minimum m and a step d = (max - min) / 15, and codes q = round((W - m) / d)
in 0..15, so W ~ q * d + m and every weight is off by at most d/2 (the group's two extremes are
coded exactly, up to the bf16 rounding of d and m).

The matmul is torch._weight_int4pack_mm_for_cpu (an AVX-512/AVX2 kernel reading the packed
nibbles) with bf16 activations. Its group parameters are a "scale" and a "zero" in its own
convention, w = (q - 8) * scale + zero, so scale = d and zero = m + 8 d, both stored in bf16.
Why int4 next to int8: decoding reads every weight once per token, and on the 2-core Xeon
(AVX-512, 20 GB/s) one 1536x576 layer at 1 row took 33 us against 66 us for int8pack and 142 us
for fp32 (30 distinct weights, best of 15; scripts/bench_decode.py times the whole model). Up to
~64 rows it beats an fp32 GEMM; at 256 rows (a long prompt's prefill, paid once per answer) it is
~1.6x slower than fp32.

CPU only: the CUDA kernel (torch._weight_int4pack_mm) wants another packing, not written here,
so a model on another device is refused in one line. The embedding of a tied model stays float
(a row is read once per token); the head is int4. Quality is stated as a perplexity delta in
tests/test_quantize.py (PPL_DELTA_INT4 there: +5.8% en, +6.7% zh, +9.4% th on 100 PUD dev sentences).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.quantize import plain_linears, set_module

GROUP = 32
_CHUNK_ROWS = 4096  # rows quantised at a time: bounds the float temporaries of a big tensor


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N,K] (K a multiple of GROUP) -> codes q int32 [N,K] in 0..15, step d and minimum m
    [N, K/GROUP] (bf16, as the kernel reads them); the codes are computed against the bf16 d, m."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {GROUP}")
    q = torch.empty(n, k, dtype=torch.int32, device=w.device)
    d = torch.empty(n, k // GROUP, dtype=torch.bfloat16, device=w.device)
    m = torch.empty_like(d)
    for start in range(0, n, _CHUNK_ROWS):
        g = w[start:start + _CHUNK_ROWS].float().reshape(-1, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        step = ((hi - lo) / 15).to(torch.bfloat16)
        low = lo.to(torch.bfloat16)
        safe = torch.where(step == 0, 1.0, step.float())[..., None]  # a constant group: all codes 0
        codes = ((g - low.float()[..., None]) / safe).round().clamp(0, 15)
        q[start:start + len(g)] = codes.reshape(len(g), k).to(torch.int32)
        d[start:start + len(g)], m[start:start + len(g)] = step, low
    return q, d, m


def dequantize_groups(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The weight the codes stand for, fp32 [N,K]: q * d + m per group (the reference)."""
    n, k = q.shape
    g = q.float().reshape(n, k // GROUP, GROUP)
    return (g * d.float()[..., None] + m.float()[..., None]).reshape(n, k)


class Int4Linear(nn.Module):
    """y = x @ W^T + bias through the CPU int4 kernel; x [..., K] -> [..., N] in x's dtype.

    Buffers: packed (the kernel's layout of the codes) and scales_and_zeros [K/GROUP, N, 2] bf16.
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, d, m = quantize_groups(weight.detach())
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        zero = (m.float() + 8 * d.float()).to(torch.bfloat16)
        self.register_buffer("scales_and_zeros", torch.stack([d, zero], dim=-1).transpose(0, 1).contiguous())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 (groups of {GROUP})"


def quantize_int4(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a Llama (attention, MLP, head) by an Int4Linear, in place;
    returns the model (eval, inference only). A tied embedding keeps its float weight.

    Refuses, before changing anything, a model with LoRA layers (merge them first:
    model.lora.merge_lora), a model that is not on the CPU, and a layer of a shape the kernel
    does not take (in_features a multiple of 32, out_features of 16).
    """
    linears = plain_linears(model, "quantize_int4")
    for name, module in linears:
        n, k = module.weight.shape
        if n % 16 or k % GROUP:  # the kernel's packing works on 16 output rows at a time
            raise ValueError(f"quantize_int4: {name} is {k} -> {n}; int4 needs in_features a multiple of "
                             f"{GROUP} and out_features a multiple of 16")
        if module.weight.device.type != "cpu":
            raise ValueError(f"quantize_int4: {name} is on {module.weight.device}; int4 is implemented "
                             "for CPU decoding only (use --quantize int8 on a GPU)")
    # A tied embedding keeps the float Parameter it shares with the head: only the head module
    # is replaced below, so nothing is copied.
    for name, module in linears:
        set_module(model, name, Int4Linear(module.weight, module.bias))
    return model.eval()
