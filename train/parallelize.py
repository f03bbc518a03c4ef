"""Training-time transformations of a Llama, applied from outside the model, in torchtitan's order:

  1. activation checkpointing: each block recomputes its forward during backward instead of
     keeping its activations;
  2. compile: each block's forward goes through torch.compile (inductor: C++/OpenMP on CPU,
     Triton on GPU), which fuses the elementwise work between the matmuls (norms, rotary,
     SwiGLU, LoRA dropout) and keeps fewer activations. A block is compiled, not the whole model,
     so the 30 identical blocks of a model share one compiled graph (compile time of one block)
     and the chunked loss (a Python loop) stays eager;
  3. FSDP2: `fully_shard` each block, then the root (embeddings, final norm, head).

Why this order: checkpointing wraps the plain forward so the compiler sees the recomputation
and can plan around it; FSDP's hooks come last, around the compiled forward, so every
all-gather and reduce-scatter stays outside the compiled graph.

All three keep the module tree and parameter names as they are (each replaces a block's
`forward` on the instance; FSDP2 shards in place), so state dicts, checkpoints and the export
see HF names and nothing else.

Precision (`--mixed-precision`, see resolve_dtype): fp32 or bf16 compute, with fp32 master
weights, gradients and optimizer state in both cases.
  - With FSDP, bf16 is its MixedPrecisionPolicy: bf16 all-gathered weights, fp32 reduction.
  - Without FSDP (one CPU process), bf16 is autocast around forward: matmuls (the base layers,
    LoRA, attention, the head) in bf16, the residual stream, norms and the loss in fp32, the
    stored weights untouched (so checkpoints and the merged export keep fp32 base weights).
    `Plan.autocast()` is that context; the trainer runs forward (and its loss) inside it.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The CPU features of this machine that run bf16 matmuls natively (AMX tiles, AVX512-BF16),
    read from /proc/cpuinfo's flags, else from torch's own probe; [] = none.

    Without them oneDNN emulates bf16 matmuls: measured 0.16 GFLOP/s against 32 GFLOP/s in fp32
    on a 2-core AVX2 EPYC (2048^3), so bf16 would be ~200x slower there, not faster.
    """
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path(cpuinfo).read_text().splitlines()
                      if line.startswith("flags")), [])
        return [f for f in _CPU_BF16_FLAGS if f in flags]
    except OSError:  # not Linux: ask torch (private probes, present since 2.1)
        probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
        return [f for f, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]


def resolve_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """--mixed-precision -> the compute dtype. auto: bf16 on a GPU, and on a CPU with native bf16
    matmuls (cpu_bf16_flags); fp32 on any other CPU. fp32 / bf16 are taken as given."""
    if mixed_precision in DTYPES:
        return DTYPES[mixed_precision]
    if mixed_precision != "auto":
        raise ValueError(f"--mixed-precision {mixed_precision!r}: choose auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bf16_flags() else torch.float32


def precision_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """One line when bf16 was asked for on a CPU that only emulates it (slow, not wrong)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_bf16_flags():
        return ("note: --mixed-precision bf16 on a CPU without AMX / AVX512-BF16: its bf16 matmuls are emulated "
                "and much slower than fp32 (--mixed-precision auto picks fp32 here)")
    return None


@dataclass(frozen=True)
class Plan:
    """What parallelize did to the model, and the context its forward passes run in."""
    dtype: torch.dtype          # compute dtype of matmuls
    fsdp: bool                  # sharded with FSDP2 (its policy casts; else autocast does)
    device: torch.device
    activation_checkpointing: bool = False
    compiled: bool = False

    def autocast(self):
        """Context for forward + loss: bf16 autocast when no FSDP policy casts the weights."""
        if self.dtype == torch.float32 or self.fsdp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        parts = [{torch.float32: "fp32", torch.bfloat16: "bf16"}[self.dtype] +
                 (" (FSDP policy)" if self.fsdp and self.dtype != torch.float32 else
                  " (autocast)" if self.dtype != torch.float32 else "")]
        parts += ["FSDP2"] if self.fsdp else []
        parts += ["activation checkpointing"] if self.activation_checkpointing else []
        parts += ["compiled blocks"] if self.compiled else []
        return ", ".join(parts)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks of a Llama (model.model.layers)."""
    return model.model.layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Each block's forward recomputes in backward (torch.utils.checkpoint, non-reentrant; the
    RNG state is restored, so LoRA dropout draws the same mask twice). Under no_grad (eval) the
    block runs plainly."""
    for block in blocks(model):
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward (after checkpointing, so that is compiled too)."""
    for block in blocks(model):
        block.forward = torch.compile(block.forward, fullgraph=False)


def apply_fsdp(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """fully_shard each block, then the root, over all ranks. Parameters' requires_grad must be
    final before this (FSDP records it per parameter).

    Gradients are SUMMED across ranks (divide factor 1): the trainer divides the loss by the
    global loss-token count already, so FSDP's default average would divide by the world size a
    second time. bf16: bf16 weights in forward/backward, fp32 gradient reduction and fp32
    master weights / optimizer state.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    low = dtype != torch.float32
    mp = MixedPrecisionPolicy(param_dtype=dtype if low else None, reduce_dtype=torch.float32 if low else None)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def parallelize(model: nn.Module, device: torch.device, mixed_precision: str = "auto",
                activation_checkpointing: bool = False, compile: bool = False) -> Plan:
    """Apply checkpointing, compile and FSDP2 to `model` in place (in that order); -> the Plan.

    FSDP2 wraps the model when there is more than one rank, or for bf16 on a GPU (its policy
    casts the weights, as before). One CPU rank is left unwrapped, as torchtitan applies FSDP
    only when there is more than one shard: there is nothing to shard, and FSDP2 would only copy
    every weight into its all-gather buffer and back, in forward and again in backward; bf16
    there is autocast (see the module docstring). The numbers of fp32 are the same either way.
    """
    dtype = resolve_dtype(mixed_precision, device)
    fsdp = dist.get_world_size() > 1 or (dtype != torch.float32 and device.type == "cuda")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if fsdp:
        apply_fsdp(model, device, dtype)
    else:
        model.to(device)
    return Plan(dtype, fsdp, device, activation_checkpointing, compile)
