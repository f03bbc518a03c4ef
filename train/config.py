"""TrainConfig: every knob of the training loop, as one dataclass.

CLI flags map 1:1 onto fields (`--max_steps 100`, `--activation_checkpointing`, `--no-progress`),
see `parse_args`. A method's entry point (train/inscp.py, train/transllm.py) subclasses
TrainConfig to add its data and model fields; parsing, hashing and saving work on the subclass.

Fields marked `hash=False` change how a run is observed (logging, checkpoint cadence, output
folder) but not the numbers it computes; all other fields enter the config hash that ties a
checkpoint to its run (resuming a checkpoint under a different hash is refused).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


def _meta(help: str, hash: bool = True) -> dict:
    return {"help": help, "hash": hash}


@dataclass
class TrainConfig:
    out_dir: str = field(default="runs/train", metadata=_meta(
        "run folder: config.json, metrics.jsonl, checkpoints/, final/", hash=False))
    resume: bool = field(default=False, metadata=_meta(
        "continue from the latest complete checkpoint in out_dir", hash=False))
    max_steps: int = field(default=1000, metadata=_meta("optimizer steps of the whole run"))
    grad_accum: int = field(default=1, metadata=_meta("micro-batches per rank per optimizer step"))
    lr: float = field(default=2e-4, metadata=_meta("peak learning rate"))
    min_lr: float = field(default=0.0, metadata=_meta("learning rate at the end of the cosine decay"))
    warmup_steps: int = field(default=0, metadata=_meta("linear warm-up steps from 0 to lr"))
    weight_decay: float = field(default=0.0, metadata=_meta("AdamW decoupled weight decay (matrices only)"))
    beta1: float = field(default=0.9, metadata=_meta("AdamW beta1"))
    beta2: float = field(default=0.999, metadata=_meta("AdamW beta2"))
    adam_eps: float = field(default=1e-8, metadata=_meta("AdamW epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=_meta("clip the global gradient norm; 0 = no clipping"))
    mixed_precision: str = field(default="auto", metadata=_meta(
        "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32: compute dtype of FSDP's all-gathered weights"))
    activation_checkpointing: bool = field(default=False, metadata=_meta(
        "recompute each block in backward instead of storing its activations"))
    seed: int = field(default=0, metadata=_meta("seed of the torch RNG (dropout) on rank 0; rank r uses seed+r"))
    loss_chunk_size: int = field(default=4096, metadata=_meta(
        "tokens per chunk of the fused head + cross-entropy (bounds logits memory)", hash=False))
    log_every: int = field(default=1, metadata=_meta("write a metrics line every N steps", hash=False))
    eval_every: int = field(default=0, metadata=_meta("eval loss every N steps; 0 = only at the end", hash=False))
    eval_batches: int = field(default=8, metadata=_meta("micro-batches per rank in one eval", hash=False))
    save_every: int = field(default=0, metadata=_meta("checkpoint every N steps; 0 = only at the end", hash=False))
    keep_last: int = field(default=2, metadata=_meta("complete checkpoints kept on disk", hash=False))
    export: bool = field(default=True, metadata=_meta(
        "at the end write out_dir/final (merged HF model) and out_dir/adapter (LoRA)", hash=False))
    progress: bool = field(default=True, metadata=_meta("tqdm progress bar on rank 0", hash=False))

    def __post_init__(self):
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: choose auto, bf16 or fp32")
        for name in ("max_steps", "grad_accum", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        bound, steps = self.warmup_bound()
        if self.warmup_steps < 0 or self.warmup_steps > steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, {bound}={steps}]")

    def warmup_bound(self) -> tuple[str, int]:
        """(name, steps): what warmup_steps may not exceed. A recipe that runs several trainings
        with their own step counts (train/transllm.py) overrides it."""
        return "max_steps", self.max_steps


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def hashed_fields(config) -> dict:
    """The fields that determine the run's numbers (those not marked hash=False)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("hash", True)}


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


def _base_type(tp):
    """int | None -> int; other annotations unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def build_parser(cls=TrainConfig, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field: --name (bools: --name / --no-name)."""
    parser = parser or argparse.ArgumentParser(description=cls.__doc__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (str,)
            parser.add_argument(f"--{f.name}", nargs="*", type=item, default=default, help=help_)
        else:
            parser.add_argument(f"--{f.name}", type=tp, default=default, help=help_)
    return parser


def parse_args(cls=TrainConfig, argv: list[str] | None = None):
    """Command line -> an instance of the dataclass cls (TrainConfig or a subclass)."""
    parser = build_parser(cls)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as err:  # a bad flag value: argparse's one-line usage error, exit code 2
        parser.error(str(err))
