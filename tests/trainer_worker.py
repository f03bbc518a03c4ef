"""Test helper for tests/test_trainer.py: a tiny training run on in-memory data.

Run alone (`python tests/trainer_worker.py --out_dir X ...`, one rank) or under
`python -m torch.distributed.run --nproc_per_node=2 tests/trainer_worker.py ...`. Flags are the
TrainConfig fields plus the few below. `ToyLoader` stands in for data.loader.BatchLoader with the
same interface (next_batch / state_dict / load_state_dict).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from model.config import preset  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.lora import apply_lora  # noqa: E402
from train import distributed  # noqa: E402
from train.config import TrainConfig, parse_args  # noqa: E402
from train.faults import fault_point  # noqa: E402
from train.trainer import Trainer, run_main  # noqa: E402


class ToyLoader:
    """Deterministic batches of a learnable toy language (each row counts up by a fixed stride).

    The micro-batch a rank gets is a function of (seed, step, global micro-batch index) only, where
    rank r's j-th micro-batch of a step has global index r * grad_accum + j. So 1 rank x 2
    micro-batches and 2 ranks x 1 micro-batch see the same global batch. Each row packs two
    documents (segments, restarting positions) and a random share of its labels is masked, so
    micro-batches differ in their number of loss tokens.
    """

    def __init__(self, vocab: int, seq_len: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, seed: int = 0):
        self.vocab, self.seq_len, self.batch = vocab, seq_len, micro_batch_size
        self.rank, self.world_size, self.grad_accum, self.seed = rank, world_size, grad_accum, seed
        self.cursor = 0  # micro-batches handed out by this rank

    def batch_at(self, step: int, index: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + index)
        B, T = self.batch, self.seq_len
        start = torch.randint(self.vocab, (B, 1), generator=gen)
        stride = torch.randint(1, 4, (B, 1), generator=gen)
        seq = (start + stride * torch.arange(T + 1)) % self.vocab           # [B, T+1]
        tokens, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
        cut = torch.randint(2, T - 2, (B,), generator=gen)                   # second document starts here
        ar = torch.arange(T).expand(B, T)
        segments = (ar >= cut[:, None]).long()
        positions = torch.where(segments == 0, ar, ar - cut[:, None])
        labels[ar == cut[:, None] - 1] = -100                                # no loss across documents
        keep = torch.rand(B, T, generator=gen) > torch.rand(1, generator=gen).item() * 0.8
        labels[~keep] = -100
        return {"tokens": tokens, "labels": labels, "positions": positions, "segments": segments}

    def next_batch(self) -> dict:
        step, j = divmod(self.cursor, self.grad_accum)
        self.cursor += 1
        return self.batch_at(step, self.rank * self.grad_accum + j)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]


@dataclass
class WorkerConfig(TrainConfig):
    micro_batch_size: int = field(default=2, metadata={"help": "rows per micro-batch"})
    seq_len: int = field(default=16, metadata={"help": "tokens per row"})
    lora: bool = field(default=False, metadata={"help": "LoRA r=4 on all linear layers"})
    model_seed: int = field(default=0, metadata={"help": "init seed of the tiny model"})


def build_model(cfg: WorkerConfig):
    """-> (tiny Llama, its LoRAConfig or None)."""
    model = Llama(preset("tiny")).init_weights(seed=cfg.model_seed)
    lora = None
    if cfg.lora:
        torch.manual_seed(cfg.model_seed)  # LoRA A init
        lora = apply_lora(model, r=4, alpha=8, dropout=0.0)
    return model, lora


def make_trainer(cfg: WorkerConfig, info: distributed.DistInfo | None = None) -> Trainer:
    info = info or distributed.init("cpu")
    model, lora = build_model(cfg)
    train = ToyLoader(model.config.vocab_size, cfg.seq_len, cfg.micro_batch_size, info.rank, info.world_size,
                      cfg.grad_accum, seed=cfg.seed)
    evals = ToyLoader(model.config.vocab_size, cfg.seq_len, cfg.micro_batch_size, info.rank, info.world_size,
                      1, seed=cfg.seed + 777)
    return Trainer(model, cfg, train, evals, dist_info=info, lora=lora)


def arm_kill_in_export(step: int) -> None:
    """LANGSHIFT_FAULT=kill_in_export@<step>: SIGKILL right after the first weight file of the
    final export is written into its temp folder (the instant a killed export leaves behind)."""
    import model.checkpoint as hf
    write = hf.save_file

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        fault_point("kill_in_export", step)
    hf.save_file = write_then_die


def main(argv=None):
    cfg = parse_args(WorkerConfig, argv)
    if os.environ.get("LANGSHIFT_FAULT", "").startswith("kill_in_export@"):
        arm_kill_in_export(cfg.max_steps)
    with distributed.session("cpu") as info:
        make_trainer(cfg, info).fit()


if __name__ == "__main__":
    run_main(main)
