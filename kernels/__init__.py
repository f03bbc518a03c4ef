"""The one dispatch point for compute kernels.

The model and the trainer call only the functions below. Each picks an implementation:
  - "torch":  the plain-PyTorch reference (any device; the definition of correct);
  - "triton": the fused Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
The choice comes from set_backend(...) or the env var LANGSHIFT_KERNELS=torch|triton|auto;
"auto" (default) uses Triton when the tensor is on CUDA and triton imports, torch otherwise; a
CUDA tensor meeting a missing triton says so once (a warning), since the numbers then come from
the references. A forced backend that cannot run raises instead of silently falling back.
Forcing "triton" on CPU tensors works under TRITON_INTERPRET=1 (set before importing kernels):
that is how tests/test_kernels.py runs the kernels without a GPU.
"""
from __future__ import annotations

import os
import warnings

import torch

from kernels import torch_attention as _torch_attention
from kernels import cross_entropy as _cross_entropy
from kernels import flash_attention as _flash_attention
from kernels import rmsnorm as _rmsnorm
from kernels import rope as _rope
from kernels import swiglu as _swiglu
# IGNORE_INDEX: the one definition of the no-loss target (-100) for data/ and train/ too.
from kernels.cross_entropy import CHUNK_TOKENS, IGNORE_INDEX, linear_cross_entropy_reference  # noqa: F401
from kernels.flash_attention import attention_reference  # noqa: F401  (the eager attention path)
from kernels.rmsnorm import rms_norm_reference
from kernels.rope import apply_rope_reference
from kernels.swiglu import swiglu_reference  # noqa: F401  (the eager SwiGLU)

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("LANGSHIFT_KERNELS", "auto")


def set_backend(name: str) -> None:
    """Choose 'auto', 'torch' or 'triton' for every kernel."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} unknown; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton path should run for tensor x under the current backend."""
    if _backend not in BACKENDS:
        raise ValueError(f"LANGSHIFT_KERNELS={_backend!r} unknown; choose one of {BACKENDS}")
    if _backend == "torch":
        return False
    if _backend == "auto":
        if x.is_cuda and not _triton_available():
            _warn_once("LANGSHIFT_KERNELS=auto: triton is not installed, so CUDA tensors use the plain-PyTorch "
                       "reference kernels (pip install triton)")
            return False
        return x.is_cuda
    if not _triton_available():
        raise RuntimeError("kernel backend 'triton' forced but triton is not installed: pip install triton")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return True


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# The Triton entry points are looked up on their modules at call time (not bound at import), so a
# test that re-imports an op module under TRITON_INTERPRET=1 is dispatched to the new kernels.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x[..., D], weight[D] -> [..., D]."""
    if use_triton(x):
        return _rmsnorm.rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q[B,Hq,T,hd], k[B,Hkv,T,hd], cos/sin[B,T,hd] or [T,hd] -> rotated (q, k), new tensors."""
    if use_triton(q):
        return _rope.apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if use_triton(gate):
        return _swiglu.swiglu_triton(gate, up)
    return _swiglu.swiglu_torch(gate, up)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Causal GQA attention without a padding mask: q[B,Hq,T,hd], k/v[B,Hkv,S,hd] -> [B,Hq,T,hd]."""
    if use_triton(q):
        return _flash_attention.flash_attention_triton(q, k, v, causal=causal)
    return attention_reference(q, k, v, causal=causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor | None = None,
              key_mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """GQA attention with packed documents and key padding: q[B,Hq,T,hd], k/v[B,Hkv,S,hd] -> [B,Hq,T,hd].

    segments[B,T] int (training, T == S): document ids; a token attends only to (earlier, if
    causal) tokens of its own document, a run of equal ids. key_mask[B,S] bool: False = padded
    key. Query t is the last T of S positions (T < S: decoding with a cache). A query with no
    visible key gets zeros. Triton: the flash kernel with both masks (skipping key blocks of
    other documents); torch: SDPA (per document on CPU) or FlexAttention, see kernels/torch_attention.py.
    """
    if use_triton(q):
        return _flash_attention.flash_attention_triton(q, k, v, causal=causal, segments=segments, key_mask=key_mask)
    return _torch_attention.attention_torch(q, k, v, segments, key_mask, causal)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_size: int = CHUNK_TOKENS) -> torch.Tensor:
    """hidden[N,D], weight[V,D], targets[N] -> mean CE over tokens whose target != ignore_index."""
    if use_triton(hidden):
        return _cross_entropy.linear_cross_entropy_triton(hidden, weight, targets, ignore_index, chunk_size)
    return linear_cross_entropy_reference(hidden, weight, targets, ignore_index, chunk_size)
