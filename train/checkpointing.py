"""Training checkpoints with torch.distributed.checkpoint (DCP): atomic, last K kept, resumable.

Layout of `<out_dir>/checkpoints/`:

    step_00000120/            a complete checkpoint (only ever created by one atomic rename)
        .metadata, __0_0.distcp, __1_0.distcp ...   model + optimizer, each rank writes its shard
        rank00000.pt ...      per-rank state DCP does not shard: RNG states, data-loader cursor,
                              scheduler, counters
        meta.json             step, config hash, world size (written last)
    .tmp-step_00000140/       being written (or left by a crash): never read, removed on start

Why a temp folder and a rename: a run can die at any instant (SIGKILL, node loss). Every rank
writes into the temp folder; after a barrier rank 0 writes meta.json and renames the folder to
its final name. A rename within one file system is atomic, so a folder named step_* is complete
by construction, and `latest()` never has to guess. Old checkpoints are deleted the same way in
reverse: renamed to a temp name first, so a crash mid-delete leaves nothing that looks complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from train import distributed
from train.errors import TrainError
from train.faults import fault_point

# Frozen parameters (the base model under LoRA) never change, so checkpoints leave them out: a
# LoRA checkpoint of a 7B model is the adapter + trainable modules + their optimizer state, not
# 14 GB of base weights. Resume takes the base from the model it is given, and checks it by a
# fingerprint stored in meta.json.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_NAME = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout: torch; data code: python, numpy)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints under `root`; all methods are collective (call on every rank)."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    # ---- finding -------------------------------------------------------------------------
    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first (local view, no collective)."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            m = _NAME.match(d.name)
            if m and (d / "meta.json").is_file():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, as decided by rank 0 (collective)."""
        found = self.complete() if distributed.dist.get_rank() == 0 else None
        path = found[-1][1] if found else None
        return distributed.broadcast_object(str(path) if path else None)

    def clean_partial(self) -> list[str]:
        """Remove temp folders left by a crash during save or delete (rank 0; collective)."""
        removed = []
        if distributed.dist.get_rank() == 0 and self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d.name)
        distributed.barrier()
        return removed

    @staticmethod
    def read_meta(folder: str | os.PathLike) -> dict:
        return json.loads((Path(folder) / "meta.json").read_text())

    # ---- saving --------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             rank_state: dict, meta: dict) -> Path:
        """Write checkpoint `step`: model + optimizer (sharded, DCP), this rank's rank_state
        (torch.save), meta (rank 0). Returns the final folder."""
        rank = distributed.dist.get_rank()
        final = self.root / step_dir_name(step)
        tmp = self.root / (_TMP_PREFIX + final.name)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()

        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        fault_point("kill_in_save", step)  # tests: die with the temp folder half written
        torch.save(rank_state, tmp / f"rank{rank:05d}.pt")
        distributed.barrier()  # every rank's files are in place before the folder is published

        if rank == 0:
            meta = dict(meta, step=step, world_size=distributed.dist.get_world_size())
            _write_json(tmp / "meta.json", meta)
            if final.exists():  # same step saved twice (e.g. final save right after a periodic one)
                self._delete(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for _, old in self.complete()[:-self.keep_last]:
                self._delete(old)
        distributed.barrier()
        return final

    def _delete(self, folder: Path) -> None:
        trash = folder.with_name(f"{_TMP_PREFIX}del-{folder.name}")
        os.replace(folder, trash)  # atomic: from here on it no longer looks like a checkpoint
        shutil.rmtree(trash, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------
    def load(self, folder: str | os.PathLike, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Fill model + optimizer (in place, each rank its shard) from folder; return
        (this rank's rank_state, meta)."""
        folder = Path(folder)
        meta = self.read_meta(folder)
        world, rank = distributed.dist.get_world_size(), distributed.dist.get_rank()
        if meta["world_size"] != world:
            raise TrainError(f"{folder} was written by {meta['world_size']} ranks, this run has {world}: "
                             "resume with the same number of processes (the data cursor is per rank)")
        if meta.get("frozen_fingerprint") != frozen_fingerprint(model):
            raise TrainError(f"{folder}: the frozen (base) weights differ from those this checkpoint was "
                             "trained on; resume with the same base model")
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder))
        # strict=False because the frozen weights are absent on purpose; anything else missing is an error.
        result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                                options=StateDictOptions(ignore_frozen_params=True, strict=False))
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing or result.unexpected_keys:
            raise TrainError(f"{folder}: checkpoint does not match the model (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
        rank_state = torch.load(folder / f"rank{rank:05d}.pt", weights_only=False)
        return rank_state, meta


@torch.no_grad()
def frozen_fingerprint(model: torch.nn.Module) -> float | None:
    """A float64 checksum of all frozen parameters over all ranks (None if none are frozen).

    Each rank sums its own shards (DTensor.to_local()); the sums are added across ranks. Weighting
    each tensor's sum by its index makes swapped tensors visible too.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if not frozen:
        return None
    local = [p.to_local() if hasattr(p, "to_local") else p for p in frozen]
    total = sum((i + 1) * t.double().sum() for i, t in enumerate(local))
    total = torch.as_tensor(total, dtype=torch.float64, device=local[0].device).clone()
    return float(distributed.all_reduce_sum(total))


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (matters on power loss, not on a killed process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
