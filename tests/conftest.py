"""Shared test helpers: locate real assets or skip with the reason and the fix."""
from __future__ import annotations

import pytest

from model import assets


def need(asset_fn, *args):
    """Return asset_fn(*args), or skip the test saying which asset is missing and how to get it."""
    try:
        return asset_fn(*args)
    except FileNotFoundError as err:
        pytest.skip(f"asset missing: {err}")


def need_module(name: str):
    """Import an optional test oracle (transformers, peft, tiktoken...) or skip saying so."""
    return pytest.importorskip(name, reason=f"test oracle '{name}' not installed: pip install -e .[test]")
