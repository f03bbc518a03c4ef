"""Errors a user can act on. The entry points print their message as one line and exit 1
(no traceback): a bad output folder, a resume that cannot match, a diverged run, a full disk.

`writing(what, path)` turns the operating system's refusals while writing a run's files
(disk full, read-only file system, no permission, a file where a folder should be) into one
TrainError line that names the path and what to do, instead of the writer's own traceback (for
torch.save that is "enforce fail at inline_container.cc", for DCP a CheckpointException per rank).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re

# errno -> what the user can do about it
_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there or choose another --out-dir",
    errno.EDQUOT: "the disk quota is exhausted: free space there or choose another --out-dir",
    errno.EROFS: "the file system is read-only: choose another --out-dir",
    errno.EACCES: "permission denied: fix the folder's permissions or choose another --out-dir",
    errno.EPERM: "operation not permitted: fix the folder's permissions or choose another --out-dir",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another --out-dir",
    errno.EISDIR: "a folder stands where a file should be written: move it away or choose another --out-dir",
    errno.EEXIST: "a file stands where a folder should be created: move it away or choose another --out-dir",
}
_CODE = re.compile(r"\[Errno (\d+)\]|os error (\d+)|Os \{ code: (\d+)")


class TrainError(RuntimeError):
    """A problem with the run's inputs or state that the user can fix; the message says how."""


class TrainingDiverged(TrainError):
    """The loss or gradient norm became NaN/inf or ran away; the last verified checkpoint is kept."""


class ConfigError(ValueError):
    """Bad flag values, one message per flag ("--flag value: allowed range")."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def os_error_of(err: BaseException) -> OSError | None:
    """The OSError behind err (err itself, its cause/context chain, or one of a DCP
    CheckpointException's per-rank failures), or None when err is not about the file system."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _ADVICE:
            return e
        stack += [e.__cause__, e.__context__]
        # torch.distributed.checkpoint.api.CheckpointException.failures: {rank: (exception, traceback)}
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
    # Writers in other languages only keep the code in their message (safetensors: "IoError(Os {
    # code: 28, kind: StorageFull ..."); "[Errno 28]" is Python's own form.
    m = _CODE.search(str(err))
    code = int(next(g for g in m.groups() if g)) if m else None
    return OSError(code, os.strerror(code)) if code in _ADVICE else None


def write_error_message(err: OSError, what: str, path: os.PathLike | str) -> str:
    """One line: what could not be written where, the system's reason, and what to do."""
    where = err.filename or path
    name = errno.errorcode.get(err.errno, str(err.errno))
    return f"cannot write {what} to {where}: {os.strerror(err.errno)} ({name}); {_ADVICE[err.errno]}"


@contextlib.contextmanager
def writing(what: str, path: os.PathLike | str):
    """`with writing("the checkpoint", folder):` an OSError of the kinds above (also one wrapped
    by the writer) becomes TrainError(one line); anything else passes through unchanged."""
    try:
        yield
    except TrainError:
        raise
    except BaseException as err:  # DCP's CheckpointException derives from BaseException
        found = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else os_error_of(err)
        if found is None:
            raise
        raise TrainError(write_error_message(found, what, path)) from None
