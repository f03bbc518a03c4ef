"""TrainConfig: every knob of the training loop, as one dataclass.

CLI flags are generated from the fields by data.flags (`--max-steps 100`,
`--activation-checkpointing`, `--no-progress`; the underscore spelling `--max_steps` is accepted
too), see `parse_args`. A method's entry point (train/inscp.py, train/transllm.py) subclasses
TrainConfig to add its data and model fields, and changes inherited defaults with a `defaults`
mapping; parsing, hashing and saving work on the subclass.

Fields marked `hash=False` change how a run is observed (logging, checkpoint cadence, output
folder) but not the numbers it computes; all other fields enter the config hash that ties a
checkpoint to its run (resuming a checkpoint under a different hash is refused).

Every value is checked when the config is built, before any work: each field's rule and choices
(in its flag(...)), and `problems()` for the checks that involve several fields. A bad command
line prints one line per bad flag, naming the flag, its value and the allowed range, and exits
with 2 (argparse's code for usage errors), printed by rank 0 only under torchrun.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import kernels
from data.flags import Flags, at_least, factor, flag, fraction, non_negative, parse, positive
from train.errors import ConfigError


def _out_dir(v: str) -> str | None:
    if not v:
        return "must name a folder"
    return "is a file, not a folder: choose another --out-dir" if Path(v).exists() and not Path(v).is_dir() else None


@dataclass
class TrainConfig(Flags):
    out_dir: str = flag("runs/train", "run folder: config.json, metrics.jsonl, checkpoints/, final/", rule=_out_dir,
                        hash=False)
    resume: bool = flag(False, "continue from the latest complete checkpoint in out_dir", hash=False)
    max_steps: int = flag(1000, "optimizer steps of the whole run", rule=at_least(1))
    grad_accum: int = flag(1, "micro-batches per rank per optimizer step", rule=at_least(1))
    lr: float = flag(2e-4, "peak learning rate", rule=positive)
    min_lr: float = flag(0.0, "learning rate at the end of the cosine decay", rule=non_negative())
    warmup_steps: int | None = flag(None, "linear warm-up steps from 0 to lr (default: DEFAULT_WARMUP of the recipe, "
                                          "3 for train/inscp.py and 0 elsewhere, capped at --max-steps)")
    weight_decay: float = flag(0.0, "AdamW decoupled weight decay (matrices only)", rule=non_negative())
    beta1: float = flag(0.9, "AdamW beta1", rule=fraction)
    beta2: float = flag(0.999, "AdamW beta2", rule=fraction)
    adam_eps: float = flag(1e-8, "AdamW epsilon", rule=positive)
    max_grad_norm: float = flag(1.0, "clip the global gradient norm; 0 = no clipping",
                                rule=non_negative(" (0 = no clipping)"))
    mixed_precision: str = flag("auto", "auto (bf16 on GPU and on CPUs with AMX / AVX512-BF16, fp32 on other CPUs) | "
                                        "bf16 | fp32: compute dtype (master weights and optimizer state stay fp32; "
                                        "train/parallelize.py)", choices=("auto", "bf16", "fp32"))
    activation_checkpointing: bool = flag(False, "recompute each block in backward instead of storing its activations")
    compile: bool = flag(False, "torch.compile each block (inductor; the first step of each shape pays the compile time)")
    seed: int = flag(0, "seed of the torch RNG (dropout) on rank 0; rank r uses seed+r", rule=at_least(0))
    loss_chunk_size: int = flag(kernels.CHUNK_TOKENS,
                                "tokens per chunk of the fused head + cross-entropy (bounds logits memory)",
                                rule=at_least(0, " (0 = all tokens at once)"), hash=False)
    log_every: int = flag(1, "write a metrics line every N steps", rule=at_least(1), hash=False)
    eval_every: int = flag(0, "eval loss every N steps; 0 = only at the end", rule=at_least(0, " (0 = only at the end)"),
                           hash=False)
    eval_batches: int = flag(8, "micro-batches per rank in one eval", rule=at_least(1), hash=False)
    save_every: int = flag(0, "checkpoint every N steps; 0 = only at the end",
                           rule=at_least(0, " (0 = only at the end)"), hash=False)
    keep_last: int = flag(2, "complete checkpoints kept on disk", rule=at_least(1), hash=False)
    export: bool = flag(True, "at the end write out_dir/final (merged HF model) and out_dir/adapter (LoRA)", hash=False)
    progress: bool = flag(True, "tqdm progress bar on rank 0", hash=False)
    guard_loss_factor: float = flag(4.0, "stop when the loss exceeds this x its running median (after warm-up); 0 = off",
                                    rule=factor, hash=False)
    guard_grad_factor: float = flag(1000.0, "stop when the gradient norm exceeds this x its running median (after "
                                            "warm-up); 0 = off", rule=factor, hash=False)
    guard_stall_steps: int = flag(10, "stop after this many steps in a row with gradient norm 0 or an unchanged loss; "
                                      "0 = off", rule=at_least(0, " (0 = off)"), hash=False)

    # warm-up when --warmup-steps is not given, capped at the run's steps (a default must never
    # refuse a valid run; an explicit value above --max-steps is refused)
    DEFAULT_WARMUP: ClassVar[int] = 0

    def __post_init__(self):
        if self.warmup_steps is None:
            self.warmup_steps = min(self.DEFAULT_WARMUP, max(self.max_steps, 0))
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every bad value, one line each ('--flag value: allowed'); [] = the config is valid."""
        out = super().problems()
        if isinstance(self.warmup_steps, int) and not 0 <= self.warmup_steps <= self.max_steps:
            out.append(f"--warmup-steps {self.warmup_steps}: must be in [0, {self.max_steps}] (--max-steps)")
        if math.isfinite(self.min_lr) and math.isfinite(self.lr) and self.min_lr > self.lr > 0:
            out.append(f"--min-lr {self.min_lr!r}: must be <= --lr {self.lr!r}")
        return out


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def hashed_fields(config) -> dict:
    """The fields that determine the run's numbers (those not marked hash=False), as plain values
    (a nested dataclass, e.g. a TransLLM stage, as a dict)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.metadata.get("hash", True)}


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def config_hash(config, extra: dict | None = None) -> str:
    """12 hex digits identifying the run: hashed fields (+ extra, e.g. the model's shape)."""
    blob = json.dumps({"config": hashed_fields(config), "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_config(config, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the resolved config (+ extra info such as world size and model shape) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**to_dict(config), **(extra or {})}, indent=2, default=str))
    os.replace(tmp, path)


def parse_args(cls=TrainConfig, argv: list[str] | None = None, presets: dict[str, list[str]] | None = None):
    """Command line -> an instance of the dataclass cls (TrainConfig or a subclass). Bad values:
    one `error: --flag value: allowed` line per flag on stderr, exit code 2, nothing else done.
    presets: {name: flags} for `--preset NAME` (data.flags.parse)."""
    return parse(cls, argv, presets=presets)
