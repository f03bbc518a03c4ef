"""Process-group setup and the few collectives the trainer needs.

One code path for every world size: a run started by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR in the environment) joins that group; a run started as a plain `python ...` makes a
one-rank group of its own (an in-memory HashStore, no ports), so FSDP2 sharding, DCP checkpoints
and every all-reduce below run the same way with 1 rank as with 64.

Backend: nccl when CUDA is available (one GPU per local rank), gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from train.errors import TrainError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True if init() created the process group (and teardown() should end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None = None, timeout_s: float = 1800) -> DistInfo:
    """Join (torchrun) or create (plain python: one rank) the default process group.

    device: 'cpu' or 'cuda' to force; None = cuda if available. Returns this rank's DistInfo.
    An already initialised group (e.g. set up by the caller) is reused and left alone at teardown.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if launched_by_torchrun():
            if use_cuda:  # nccl needs the rank's GPU chosen before the group forms
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timeout)
        else:
            # Single process: a private in-memory store, so no port is opened and two runs on one
            # machine never collide.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev, owns)


def teardown(info: DistInfo | None = None) -> None:
    """Destroy the process group if init() created it (info=None: destroy whatever exists)."""
    if dist.is_initialized() and (info is None or info.owns_group):
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | None = None):
    """`with session() as info:` init on entry, teardown on exit (also on error)."""
    info = init(device)
    try:
        yield info
    finally:
        teardown(info)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over all ranks, in place; returns t (a no-op copy-free path on one rank)."""
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective), or t itself when it is a plain
    tensor (one CPU rank is not sharded, see train/parallelize.parallelize)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reshard(module: torch.nn.Module) -> None:
    """Put every FSDP2-managed parameter of module back in its sharded layout: a no-op where it
    already is or where nothing is wrapped. (A forward without backward, e.g. an eval pass,
    leaves the root's parameters unsharded: full tensors, in the compute dtype.)"""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def barrier() -> None:
    dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank src's obj on every rank (decisions such as 'which checkpoint to resume' are taken
    once, on rank 0, so that ranks seeing a file system mid-rename never disagree)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def first_error(error: str | None) -> str | None:
    """Every rank's error message (None = fine) -> the first one by rank, on every rank
    (collective). Lets all ranks stop together when one of them failed alone."""
    if dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def gather_dicts(part: dict) -> dict:
    """The union of every rank's dict, on every rank (collective)."""
    if dist.get_world_size() == 1:
        return dict(part)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def on_main(fn, *args):
    """fn(*args) on rank 0 alone; its (picklable) result, or its TrainError, on every rank
    (collective). For work done once (tokenising, a lock, an export): if it fails, every rank
    stops with the same message instead of waiting in the next collective for rank 0."""
    outcome = (None, None)
    if dist.get_rank() == 0:
        try:
            outcome = (fn(*args), None)
        except TrainError as err:
            outcome = (None, str(err))
    result, error = broadcast_object(outcome) if dist.get_world_size() > 1 else outcome
    if error:
        raise TrainError(error)
    return result
