"""Shared test helpers: locate real assets or skip with the reason and the fix.

Without a CUDA device the Triton kernels run on CPU through triton's interpreter. Triton picks
interpreting or compiling when a @triton.jit function is *defined* -- its own library functions
(tl.sum, tl.sigmoid...) at `import triton` -- so TRITON_INTERPRET=1 is set here, before any test
module imports the model (and with it kernels and triton). On a GPU machine it stays unset and the
tests run the compiled kernels. torch.compile on CPU (inductor's C++ backend) is unaffected.
"""
from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from model import assets  # noqa: E402,F401


def need(asset_fn, *args):
    """Return asset_fn(*args), or skip the test saying which asset is missing and how to get it."""
    try:
        return asset_fn(*args)
    except FileNotFoundError as err:
        pytest.skip(f"asset missing: {err}")


def need_module(name: str):
    """Import an optional test oracle (transformers, peft, tiktoken...) or skip saying so."""
    return pytest.importorskip(name, reason=f"test oracle '{name}' not installed: pip install -e .[test]")
