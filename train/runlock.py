"""One run per run folder: `out_dir/.lock`, taken before anything is written there.

Two runs in one folder (or a --resume started while the first still runs) would interleave
metrics.jsonl, delete each other's temp checkpoints and race on every rename. The lock file holds
the owner's pid, host, boot id, process start time and command line as JSON. It is created
atomically (written beside, then hard-linked into place, which fails if a lock exists) and
removed when the process exits (atexit; also by run_main). A lock whose owner is gone is stale
and taken over with a notice: same host and boot, and that pid is no longer running (or is a
different process that got the same pid: its start time differs), or the machine was rebooted
since. A live owner, or one on another host that cannot be checked, makes the new run stop with
one line naming the pid.

Only rank 0 takes the lock (`hold`, collective); every rank learns the outcome.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path

from train import distributed
from train.errors import TrainError, writing

LOCK_NAME = ".lock"
_held: dict[Path, bool] = {}  # lock file -> this process created its run folder


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or ''."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "pid (comm)": state is field 3


def _identity() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "proc_start": _proc_start(pid),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(owner: dict) -> str | None:
    """Why a lock's owner can no longer be running (None = it may be running, or cannot be checked)."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return "the machine was restarted since"
    pid = int(owner.get("pid", -1))
    if pid == os.getpid():
        return None
    if not _pid_running(pid):
        return "it is no longer running"
    if owner.get("proc_start") and _proc_start(pid) not in ("", owner["proc_start"]):
        return "its pid now belongs to another process"
    return None


def _read(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held by an unknown owner


def _create(lock: Path) -> bool:
    """Atomically create the lock file with our identity; False if one exists already."""
    tmp = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_identity(), indent=2))
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError as err:  # a file system without hard links: exclusive create instead
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        try:
            with open(lock, "x") as f:
                f.write(tmp.read_text())
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(lock: Path, owner: dict) -> bool:
    """Move a stale lock aside and create ours; False if another process got there first."""
    aside = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return _create(lock)
    moved = _read(aside)
    if moved != owner:  # another process took it over between our read and our move: give it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return _create(lock)


def acquire(out_dir: str | os.PathLike) -> str | None:
    """Take out_dir's lock for this process (re-entrant). -> a notice if a stale lock was taken
    over, else None. Raises TrainError (one line, naming the owner's pid) if a live run holds it."""
    out_dir = Path(out_dir)
    lock = (out_dir / LOCK_NAME).absolute()
    if lock in _held:
        return None
    with writing("the run folder", out_dir):
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        notice = None
        for _ in range(3):
            if _create(lock):
                break
            owner = _read(lock)
            if owner is None:  # released between our attempt and our read
                continue
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                break  # ours (e.g. taken before a fork-free re-exec): keep it
            reason = stale_reason(owner)
            if reason is None:
                raise TrainError(_held_message(out_dir, lock, owner))
            if _take_over(lock, owner):
                notice = (f"note: took over the lock of {out_dir} from pid {owner.get('pid')} (started "
                          f"{owner.get('started')}): {reason}")
                break
        else:
            raise TrainError(_held_message(out_dir, lock, _read(lock) or {}))
    _held[lock] = created
    return notice


def _held_message(out_dir: Path, lock: Path, owner: dict) -> str:
    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (started {owner.get('started', '?')})"
    if owner.get("host") not in (None, socket.gethostname()):
        return (f"{out_dir} is in use by {who}; wait for that run to end, or if it is dead delete {lock}, "
                "or choose another --out-dir")
    return f"{out_dir} is in use by {who}; wait for that run to end or choose another --out-dir"


def release(out_dir: str | os.PathLike) -> None:
    """Remove our lock of out_dir; also the folder itself if this process created it and it is empty."""
    lock = (Path(out_dir) / LOCK_NAME).absolute()
    created = _held.pop(lock, None)
    if created is None:
        return
    owner = _read(lock)
    if owner and owner.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)
    if created:
        try:
            lock.parent.rmdir()  # only succeeds when nothing else was written: a failed run leaves nothing
        except OSError:
            pass


def release_all() -> None:
    for lock in list(_held):
        release(lock.parent)


atexit.register(release_all)


def hold(out_dir: str | os.PathLike) -> None:
    """Rank 0 takes out_dir's lock; a refusal reaches every rank as the same TrainError (collective)."""
    def take():
        notice = acquire(out_dir)
        if notice:
            print(notice, flush=True)
    distributed.on_main(take)
