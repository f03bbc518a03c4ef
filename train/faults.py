"""Fault injection for the crash-safety tests: make a run die, diverge or hit a write error at a
chosen point.

LANGSHIFT_FAULT=<point>@<step>, e.g. `kill_in_save@4` (SIGKILL this process after the model and
optimizer shards of checkpoint 4 are written into its temp folder, before it is published),
`kill_at_step@5` (SIGKILL after step 5's optimizer update), `kill_in_export@3` (SIGKILL while
the final export of a run that ends at step 3 is half written: armed by tests/trainer_worker.py
inside model.checkpoint.save, which this package does not own), `nan_at_step@3` (the loss of
step 3 becomes NaN), `<errno>_in_<what>@<step>` with errno one of enospc, erofs, eacces, enotdir
and what one of save, export, metrics (that write raises the OSError a full / read-only /
forbidden / wrong-type file system gives; tests run as root, where chmod does not stop writes).
Unset (always, outside tests): every call is a no-op.
"""
from __future__ import annotations

import errno
import os
import signal

_ERRNOS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES, "enotdir": errno.ENOTDIR}


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


def write_fault(what: str, step: int, path: os.PathLike | str) -> None:
    """Raise the OSError that LANGSHIFT_FAULT=<errno>_in_<what>@<step> names, as writing path would."""
    for name, code in _ERRNOS.items():
        if _armed(f"{name}_in_{what}", step):
            raise OSError(code, os.strerror(code), str(path))
