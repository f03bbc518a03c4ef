"""Training checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, last K kept.

Layout of `<out_dir>/checkpoints/`:

    step_00000120/            a complete checkpoint (only ever created by one atomic rename)
        .metadata, __0_0.distcp, __1_0.distcp ...   model + optimizer, each rank writes its shard
        rank00000.pt ...      per-rank state DCP does not shard: RNG states, data-loader cursor,
                              scheduler, counters
        meta.json             step, config hash, world size, frozen-weight fingerprint
        manifest.json         size + sha256 of every other file (written last)
    .tmp-step_00000140/       being written (or left by a crash): never read, removed on start
    damaged-step_00000160/    failed verification on resume: moved aside (kept for inspection)

Why a temp folder and a rename: a run can die at any instant (SIGKILL, node loss). Every rank
writes into the temp folder; after a barrier rank 0 writes meta.json and the manifest and
renames the folder to its final name. A rename within one file system is atomic, so a folder
named step_* was complete when it was published. Old checkpoints are deleted the same way in
reverse: renamed to a temp name first, so a crash mid-delete leaves nothing that looks complete.

Why a manifest: after publication a file can still be truncated, deleted or have bytes flipped
(a full disk during a copy, a bad sync, bit rot). Resume checks every file against the manifest
and falls back to the newest checkpoint that passes, saying so in one line. Cost: sha256 reads
every byte once more, 0.14 s per 100 MiB on one core of this project's CI box, about what
dcp.save itself takes to write those 100 MiB into the page cache (0.16 s); the work is split
across ranks (each hashes every world_size-th file), at save and again at resume.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from data.readers import file_digest
from train import distributed
from train.errors import TrainError, writing
from train.faults import fault_point, write_fault

# Frozen parameters (the base model under LoRA) never change, so checkpoints leave them out: a
# LoRA checkpoint of a 7B model is the adapter + trainable modules + their optimizer state, not
# 14 GB of base weights. Resume takes the base from the model it is given, and checks it by a
# fingerprint stored in meta.json.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_NAME = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"
MANIFEST = "manifest.json"


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


# ---- files and their checksums (sha256, data.readers.file_digest) --------------------------------
def file_problem(folder: Path, name: str, entry: dict) -> str | None:
    """What is wrong with folder/name compared to its manifest entry {bytes, sha256}, or None."""
    path = folder / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{name} has {size} bytes, the manifest says {entry['bytes']}"
    if file_digest(path) != entry["sha256"]:
        return f"{name} does not match its checksum (damaged bytes)"
    return None


def read_manifest(folder: Path) -> dict | str:
    """{file name: {bytes, sha256}} of a checkpoint, or a string saying why there is none."""
    try:
        return json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"


def verify_files(folder: Path, manifest: dict, names: list[str]) -> str | None:
    """The first problem among `names` of a checkpoint folder, or None (local, no collective)."""
    for name in names:
        problem = file_problem(folder, name, manifest[name])
        if problem:
            return problem
    return None


def verify_local(folder: str | os.PathLike) -> str | None:
    """Every file of the checkpoint against its manifest, on this process alone; None = intact."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if isinstance(manifest, str):
        return manifest
    return verify_files(folder, manifest, sorted(manifest))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write data durably with plain file I/O, so a full disk is an OSError that names its errno
    (torch.save on a file only says "enforce fail at inline_container.cc")."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        err.filename = err.filename or str(path)  # a failed write() names no file by itself
        raise


def _write_json(path: Path, obj: dict) -> None:
    _write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


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


def _together(what: str, path: Path, fn, *args, rank0_only: bool = False):
    """Run fn(*args) on this rank (or on rank 0 alone); if it fails with a write error on ANY rank,
    every rank raises the same one-line TrainError, so no rank is left waiting in a collective
    for a peer that gave up (collective)."""
    error, result = None, None
    if not rank0_only or distributed.dist.get_rank() == 0:
        try:
            with writing(what, path):
                result = fn(*args)
        except TrainError as err:
            error = str(err)
    error = distributed.first_error(error)
    if error:
        raise TrainError(error)
    return result


class CheckpointManager:
    """Saves, verifies and finds checkpoints under `root`; methods that say so are collective."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    # ---- finding -------------------------------------------------------------------------
    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every published checkpoint, oldest first (local view, no collective).
        Published is not verified: see newest_intact()."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), d) for d in self.root.iterdir() if (m := _NAME.match(d.name)) and d.is_dir()]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest published checkpoint, as decided by rank 0 (collective)."""
        found = self.complete() if distributed.dist.get_rank() == 0 else None
        path = found[-1][1] if found else None
        return distributed.broadcast_object(str(path) if path else None)

    def verify(self, folder: str | os.PathLike) -> str | None:
        """Check every file of a checkpoint against its manifest, each rank taking every
        world_size-th file (collective). -> None if intact, else the first problem found."""
        folder = Path(folder)
        rank, world = distributed.dist.get_rank(), distributed.dist.get_world_size()
        manifest = distributed.broadcast_object(read_manifest(folder) if rank == 0 else None)
        if isinstance(manifest, str):
            return manifest
        names = sorted(manifest)
        return distributed.first_error(verify_files(folder, manifest, names[rank::world]))

    def newest_intact(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """(newest checkpoint that passes verify(), [(newer damaged folder, problem)]) (collective)."""
        found = distributed.broadcast_object(self.complete() if distributed.dist.get_rank() == 0 else None)
        damaged = []
        for _, folder in reversed(found):
            problem = self.verify(folder)
            if problem is None:
                return folder, damaged
            damaged.append((folder, problem))
        return None, damaged

    def newest_verified_local(self) -> Path | None:
        """The newest checkpoint whose files all match its manifest (this process alone)."""
        for _, folder in reversed(self.complete()):
            if verify_local(folder) is None:
                return folder
        return None

    def set_aside(self, folder: Path) -> Path:
        """Rename a damaged checkpoint out of the step_* namespace (kept, never resumed or pruned)."""
        target = folder.with_name(DAMAGED_PREFIX + folder.name)
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}.{n}")
        os.replace(folder, target)
        return target

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
        """Write checkpoint `step` (collective): model + optimizer (sharded, DCP), this rank's
        rank_state, then (rank 0) meta.json and the manifest. Returns the final folder. A write
        error on any rank (full disk, read-only, ...) is one TrainError on every rank; the temp
        folder is removed and the previous checkpoints stay as they were."""
        rank, world = distributed.dist.get_rank(), distributed.dist.get_world_size()
        final = self.root / step_dir_name(step)
        tmp = self.root / (_TMP_PREFIX + final.name)
        what = "the checkpoint"
        try:
            _together(what, tmp, self._make_tmp, tmp, step, rank0_only=True)
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
            with writing(what, tmp):  # DCP gathers every rank's failure and raises it on all ranks
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            fault_point("kill_in_save", step)  # tests: die with the temp folder half written
            buffer = io.BytesIO()
            torch.save(rank_state, buffer)
            _together(what, tmp, _write_bytes, tmp / f"rank{rank:05d}.pt", buffer.getvalue())
            meta = dict(meta, step=step, world_size=world)
            _together(what, tmp, _write_json, tmp / "meta.json", meta, rank0_only=True)
            names = distributed.broadcast_object(sorted(p.name for p in tmp.iterdir()) if rank == 0 else None)
            # every rank hashes every world-th file: the manifest costs 1/world of a full read each
            digests = distributed.gather_dicts({n: {"bytes": (tmp / n).stat().st_size, "sha256": file_digest(tmp / n)}
                                                for n in names[rank::world]})
            _together(what, tmp, self._publish, tmp, final, digests, rank0_only=True)
        except TrainError:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _make_tmp(self, tmp: Path, step: int) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        write_fault("save", step, tmp)  # tests: a full / read-only disk
        tmp.mkdir(parents=True)

    def _publish(self, tmp: Path, final: Path, digests: dict) -> None:
        """Rank 0: manifest last, then the atomic rename, then prune to keep_last."""
        _write_json(tmp / MANIFEST, {"files": digests})
        if final.exists():  # same step saved twice (e.g. final save right after a periodic one)
            self._delete(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        for _, old in self.complete()[:-self.keep_last]:
            self._delete(old)

    def _delete(self, folder: Path) -> None:
        trash = folder.with_name(f"{_TMP_PREFIX}del-{folder.name}")
        os.replace(folder, trash)  # atomic: from here on it no longer looks like a checkpoint
        shutil.rmtree(trash, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------
    def load(self, folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             fingerprint: str | None) -> tuple[dict, dict]:
        """Fill model + optimizer (in place, each rank its shard) from a verified folder; return
        (this rank's rank_state, meta). fingerprint: frozen_fingerprint(model), to compare."""
        folder = Path(folder)
        meta = self.read_meta(folder)
        world, rank = distributed.dist.get_world_size(), distributed.dist.get_rank()
        if meta["world_size"] != world:
            raise TrainError(f"{folder} was written by {meta['world_size']} ranks, this run has {world}: "
                             "resume with the same number of processes (the data cursor is per rank)")
        if meta.get("frozen_fingerprint") != fingerprint:
            raise TrainError(f"{folder}: the frozen (base) weights differ from those this checkpoint was "
                             "trained on; resume with the same base model")
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(folder))
        except (Exception, CheckpointException) as err:  # verified, so: written by other code
            raise TrainError(f"{folder}: cannot be read back ({type(err).__name__}); it was not written by "
                             "this version of the trainer, or the model differs") from None
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


def _bit_moments(t: torch.Tensor) -> torch.Tensor:
    """int64 [sum, sum of squares] of t's raw bits read as 16-bit integers (8-bit for 1-byte dtypes).

    Integer sums are exact and order-free, so the total over shards equals the total over the full
    tensor whatever the sharding (or whether FSDP left the tensor unsharded after an eval pass).
    16-bit pieces keep both sums far from int64 overflow (|x| < 2^15, x^2 < 2^30 per piece).
    """
    flat = t.detach().contiguous().view(-1)
    flat = flat.view(torch.int8 if flat.element_size() == 1 else torch.int16)
    out = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for piece in flat.split(1 << 24):  # bounded temporaries (int32 squares of 16M pieces: 64 MB)
        out[0] += piece.sum(dtype=torch.int64)
        out[1] += piece.to(torch.int32).square().sum(dtype=torch.int64)
    return out


@torch.no_grad()
def frozen_fingerprint(model: torch.nn.Module) -> str | None:
    """A hex digest of all frozen parameters, identical on every rank and for every layout of the
    same values (None if nothing is frozen). Collective.

    A sharded parameter (DTensor) contributes its local shard's bit moments, summed over ranks; a
    plain one (one rank, or a module FSDP left unsharded) contributes its own, once. The digest
    covers every frozen name, shape and the moments, so a changed, swapped or resized tensor shows.
    """
    distributed.reshard(model)  # an unsharded bf16 compute copy would give other bits
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    device = frozen[0][1].device
    sharded = torch.zeros(len(frozen), 2, dtype=torch.int64, device=device)
    whole = torch.zeros(len(frozen), 2, dtype=torch.int64)
    for i, (_, p) in enumerate(frozen):
        if hasattr(p, "to_local"):
            sharded[i] = _bit_moments(p.to_local())
        else:
            whole[i] = _bit_moments(p).cpu()
    moments = (distributed.all_reduce_sum(sharded).cpu() + whole).tolist()
    blob = json.dumps([[n, list(p.shape), str(p.dtype), m] for (n, p), m in zip(frozen, moments)])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
