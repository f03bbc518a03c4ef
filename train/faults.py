"""Fault injection for the crash-safety tests: make a run die or diverge at a chosen point.

LANGSHIFT_FAULT=<point>@<step>, e.g. `kill_in_save@4` (SIGKILL this process after the model and
optimizer shards of checkpoint 4 are written into its temp folder, before it is published),
`kill_at_step@5` (SIGKILL after step 5's optimizer update), `nan_at_step@3` (the loss of step 3
becomes NaN). Unset (always, outside tests): every call is a no-op.
"""
from __future__ import annotations

import os
import signal


def _armed(point: str, step: int) -> bool:
    spec = os.environ.get("LANGSHIFT_FAULT", "")
    return bool(spec) and spec == f"{point}@{step}"


def fault_point(point: str, step: int) -> None:
    """SIGKILL this process if LANGSHIFT_FAULT names this point and step (no cleanup can run)."""
    if point.startswith("kill") and _armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def inject_nan(step: int) -> bool:
    """True if the loss of this step should be replaced by NaN."""
    return _armed("nan_at_step", step)
