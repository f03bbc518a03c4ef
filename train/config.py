"""TrainConfig: every knob of the training loop, as one dataclass.

CLI flags map 1:1 onto fields (`--max_steps 100`, `--activation_checkpointing`, `--no-progress`),
see `parse_args`. A method's entry point (train/inscp.py, train/transllm.py) subclasses
TrainConfig to add its data and model fields; parsing, hashing and saving work on the subclass.

Fields marked `hash=False` change how a run is observed (logging, checkpoint cadence, output
folder) but not the numbers it computes; all other fields enter the config hash that ties a
checkpoint to its run (resuming a checkpoint under a different hash is refused).

Every value is checked when the config is built, before any work: `RULES` maps a field to its
rule (a subclass adds its own), `problems()` adds the checks that involve several fields. A bad
command line prints one line per bad flag, naming the flag, its value and the allowed range, and
exits with 2 (argparse's code for usage errors), printed by rank 0 only under torchrun.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from train.errors import ConfigError


def _meta(help: str, hash: bool = True) -> dict:
    return {"help": help, "hash": hash}


# ---- rules: value -> None (fine) or what is allowed ------------------------------------------------
def at_least(lo: int, note: str = ""):
    return lambda v: None if v >= lo else f"must be >= {lo}{note}"


def positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def non_negative(note: str = ""):
    return lambda v: None if math.isfinite(v) and v >= 0 else f"must be a finite number >= 0{note}"


def fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def choice(*options: str):
    shown = ", ".join(o or "''" for o in options)
    return lambda v: None if v in options else f"choose one of {shown}"


def factor(v: float) -> str | None:
    return None if v == 0 or (math.isfinite(v) and v > 1) else "must be 0 (off) or a finite number > 1"


def zero_or_at_least(lo: int, note: str = ""):
    return lambda v: None if v == 0 or v >= lo else f"must be 0{note} or >= {lo}"


def _out_dir(v: str) -> str | None:
    if not v:
        return "must name a folder"
    return "is a file, not a folder: choose another --out_dir" if Path(v).exists() and not Path(v).is_dir() else None


def flag_problem(name: str, value, rule) -> str | None:
    """'--name value: what is allowed', or None if rule accepts value."""
    problem = rule(value)
    return f"--{name} {value!r}: {problem}" if problem else None


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
    warmup_steps: int | None = field(default=None, metadata=_meta(
        "linear warm-up steps from 0 to lr (default: DEFAULT_WARMUP of the recipe, 3 for train/inscp.py and "
        "0 elsewhere, capped at the run's steps)"))
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
    guard_loss_factor: float = field(default=4.0, metadata=_meta(
        "stop when the loss exceeds this x its running median (after warm-up); 0 = off", hash=False))
    guard_grad_factor: float = field(default=1000.0, metadata=_meta(
        "stop when the gradient norm exceeds this x its running median (after warm-up); 0 = off", hash=False))
    guard_stall_steps: int = field(default=10, metadata=_meta(
        "stop after this many steps in a row with gradient norm 0 or an unchanged loss; 0 = off", hash=False))

    # warm-up when --warmup_steps is not given, capped at the run's steps (a default must never
    # refuse a valid run; an explicit value above the bound is refused)
    DEFAULT_WARMUP: ClassVar[int] = 0
    RULES: ClassVar[dict] = {
        "out_dir": _out_dir, "max_steps": at_least(1), "grad_accum": at_least(1), "lr": positive,
        "min_lr": non_negative(), "weight_decay": non_negative(), "beta1": fraction, "beta2": fraction,
        "adam_eps": positive, "max_grad_norm": non_negative(" (0 = no clipping)"),
        "mixed_precision": choice("auto", "bf16", "fp32"), "seed": at_least(0),
        "loss_chunk_size": at_least(0, " (0 = all tokens at once)"), "log_every": at_least(1),
        "eval_every": at_least(0, " (0 = only at the end)"), "eval_batches": at_least(1),
        "save_every": at_least(0, " (0 = only at the end)"), "keep_last": at_least(1),
        "guard_loss_factor": factor, "guard_grad_factor": factor, "guard_stall_steps": at_least(0, " (0 = off)"),
    }

    def __post_init__(self):
        _, bound = self.warmup_bound()
        if self.warmup_steps is None:
            self.warmup_steps = min(self.DEFAULT_WARMUP, max(bound, 0))
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every bad value, one line each ('--flag value: allowed'); [] = the config is valid."""
        rules: dict = {}
        for klass in reversed(type(self).__mro__):  # a subclass's rule replaces its parent's
            rules.update(vars(klass).get("RULES", {}))
        out = [flag_problem(name, getattr(self, name), rule) for name, rule in rules.items()]
        out = [p for p in out if p]
        bound_name, bound = self.warmup_bound()
        if isinstance(self.warmup_steps, int) and not 0 <= self.warmup_steps <= bound:
            out.append(f"--warmup_steps {self.warmup_steps}: must be in [0, {bound}] ({bound_name})")
        if math.isfinite(self.min_lr) and math.isfinite(self.lr) and self.min_lr > self.lr > 0:
            out.append(f"--min_lr {self.min_lr!r}: must be <= --lr {self.lr!r}")
        return out

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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block), printed by rank 0 only."""

    def error(self, message: str):
        fail([message])


def fail(problems: list[str], code: int = 2):
    """Print each problem as one `error: ...` line (rank 0 of a torchrun job only) and exit."""
    if os.environ.get("RANK", "0") == "0":
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr, flush=True)
    sys.exit(code)


def join_negative_numbers(argv: list[str]) -> list[str]:
    """['--lr', '-1e-3'] -> ['--lr=-1e-3']: argparse takes '-1e-3' for an option (its negative
    number pattern has no exponent), so a negative value would be unparseable as written."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser(cls=TrainConfig, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field: --name (bools: --name / --no-name)."""
    parser = parser or OneLineParser(description=cls.__doc__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (str,)
            parser.add_argument(f"--{f.name}", nargs="*", type=item, default=default, help=help_)
        else:
            parser.add_argument(f"--{f.name}", type=tp, default=default, help=help_)
    return parser


def parse_args(cls=TrainConfig, argv: list[str] | None = None):
    """Command line -> an instance of the dataclass cls (TrainConfig or a subclass). Bad values:
    one `error: --flag value: allowed` line per flag on stderr, exit code 2, nothing else done."""
    parser = build_parser(cls)
    args = parser.parse_args(join_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    try:
        return cls(**vars(args))
    except ConfigError as err:
        fail(err.problems)
    except ValueError as err:
        fail([str(err)])
