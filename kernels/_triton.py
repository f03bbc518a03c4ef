"""Optional Triton import shared by the kernel files.

Without triton installed the op modules still import (their plain-PyTorch references work on any
device); `triton.jit` then leaves the kernel bodies as plain Python functions that are never
launched, because the dispatch in kernels/__init__.py refuses the triton backend first.

Note: triton decides between compiling and interpreting (TRITON_INTERPRET=1) when a kernel is
*defined*, i.e. when the op module is imported, so set that variable before importing `kernels`.
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _NoTriton:
        """Just enough of `triton` for the kernel definitions to import."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(n - 1, 0).bit_length()

    triton = _NoTriton()
    tl = None


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors) -> None:
    """Kernels take CUDA tensors, or CPU tensors under the interpreter; say so otherwise."""
    for t in tensors:
        if not t.is_cuda and not interpreting():
            raise RuntimeError(f"Triton kernel got a {t.device} tensor: use CUDA, or set TRITON_INTERPRET=1 "
                               "before importing kernels to run on CPU through the interpreter")
