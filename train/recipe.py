"""What every method's entry point shares: the model and data fields of its config, and the steps
from flags to a ready Trainer (load model -> adapters -> token files -> loaders).

train/inscp.py and train/transllm.py subclass `RecipeConfig`; each flag maps onto one field.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from data.flags import at_least, flag, fraction, positive, zero_or_at_least
from data.loader import BatchLoader, PackedDataset
from data.prepare import PrepareConfig, prepare, sources
from data.readers import DataError
from data.tokenfile import VERSION, NoSamples, TokenFile, tokenizer_identity
from eval.quick import QuickSizes
from model import assets
from model.chat import get_template
from model.checkpoint import load
from model.lora import ALL_LINEAR, apply_lora
from train import distributed
from train.config import TrainConfig
from train.errors import TrainError, writing
from train.report import sizes_problems


def _missing(paths: list[str]) -> str | None:
    bad = [p for p in paths if not Path(p).is_file()]
    return f"{bad[0]} is not a file" if bad else None


def _linear_layers(names: list[str]) -> str | None:
    bad = [n for n in names if n not in ALL_LINEAR]
    if bad:
        return f"{bad[0]!r} is not one of {', '.join(ALL_LINEAR)}"
    return None if names else f"name at least one of {', '.join(ALL_LINEAR)}"


def _device(device: str) -> str | None:
    if device not in ("", "cpu", "cuda"):
        return "choose cpu or cuda (empty: cuda when present)"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available to this process (torch.cuda.is_available() is False)"
    return None


@dataclass
class RecipeConfig(TrainConfig):
    model: str = flag("", "HF folder or .gguf to start from (default: SmolLM2-135M-Instruct GGUF)",
                      rule=lambda v: None if not v or Path(v).exists() else "no such file or folder")
    data: list[str] = flag([], "training data files (.txt / .jsonl)", rule=_missing)
    eval_data: list[str] = flag([], "held-out data files; none: every eval_split-th record of --data is held out "
                                    "instead", rule=_missing)
    eval_split: int = flag(20, "without --eval-data hold out every N-th record; 0 = no eval",
                           rule=zero_or_at_least(2, " (no eval)"))
    template: str = flag("", "chat template, a model.chat.TEMPLATES name (default: recognised from the stored one)")
    text_field: str = flag("text", "text field of .jsonl text files", rule=lambda v: None if v else "must not be empty")
    paragraphs: bool = flag(False, ".txt files: blank-line separated documents (default: one per line)")
    seq_len: int = flag(512, "tokens per packed block",
                        rule=at_least(2, " (a block holds tokens and their next-token targets)"))
    micro_batch_size: int = flag(4, "blocks per micro-batch per rank", rule=at_least(1))
    finetune: str = flag("lora", "LoRA adapters, or every weight", choices=("lora", "full"))
    lora_r: int = flag(16, "LoRA rank", rule=at_least(1))
    lora_alpha: float = flag(32.0, "LoRA alpha (scale = alpha / r)", rule=positive)
    lora_dropout: float = flag(0.05, "dropout on the LoRA path", rule=fraction)
    lora_targets: list[str] = flag(list(ALL_LINEAR), "linear layers that get adapters", rule=_linear_layers)
    trainable_modules: list[str] = flag([], "modules trained in full beside LoRA, e.g. embed_tokens lm_head")
    device: str = flag("", "cpu | cuda (default: cuda when present)", rule=_device, hash=False)
    report: bool = flag(True, "end with eval.quick's report of the starting model and of the result side by side: "
                              "out_dir/report.md, report.json, chart_*.svg (rank 0; train/report.py)", hash=False)
    report_sizes: QuickSizes = flag(QuickSizes(), "how much the report reads and generates (eval.quick.QuickSizes)",
                                    hash=False)

    def problems(self) -> list[str]:
        out = super().problems() + sizes_problems(self.report_sizes)
        if self.report and not self.export:
            out.append("--report: needs --export (the report reads the merged final model); or pass --no-report")
        return out


def model_path(cfg: RecipeConfig) -> str:
    """The model the run starts from: --model, else the demo's SmolLM2-135M-Instruct GGUF."""
    return cfg.model or str(assets.smollm2_gguf())


def load_model(cfg: RecipeConfig):
    """-> (Llama in fp32 on CPU, tokenizer); the Trainer moves it to the device when sharding."""
    path = model_path(cfg)
    try:
        model, tokenizer = load(path, dtype=torch.float32)
    except (FileNotFoundError, ValueError) as err:
        raise TrainError(f"--model: {err}") from None
    if cfg.seq_len > model.config.max_seq_len:
        raise TrainError(f"--seq-len {cfg.seq_len} is above the model's context of {model.config.max_seq_len} "
                         f"tokens ({path}): pass --seq-len {model.config.max_seq_len} or less")
    return model, tokenizer


def chat_template(tokenizer, name: str = "", system: str | None = None):
    """model.chat.get_template, its refusal (an unknown or undetectable template) as one TrainError
    line; call it before tokenising, so a bad --template stops the run before any work."""
    try:
        return get_template(tokenizer, name or None, system)
    except ValueError as err:
        raise TrainError(f"--template {name!r}: {err}" if name else str(err)) from None


def add_adapters(model, cfg: RecipeConfig):
    """LoRA from outside the model (or nothing, for full fine-tuning) -> its LoRAConfig (None for
    full fine-tuning), for the Trainer. The seed makes every rank draw the same A matrices. A
    --trainable-modules name that matches no module is refused."""
    if cfg.finetune == "lora":
        modules = [n for n, _ in model.named_modules()]
        for wanted in cfg.trainable_modules:
            if not any(n == wanted or n.endswith("." + wanted) for n in modules):
                raise TrainError(f"--trainable-modules {wanted!r}: no module of that name in the model "
                                 "(e.g. embed_tokens, lm_head, norm)")
        torch.manual_seed(cfg.seed)
        return apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.trainable_modules)
    return None


def token_files(cfg: RecipeConfig, fmt: str, tokenizer, template, info: distributed.DistInfo,
                data: list[str] | None = None, eval_data: list[str] | None = None, **options) -> tuple[Path, Path | None]:
    """Tokenise the data once (rank 0) into out_dir/tokens/<format>-<key>/{train,eval}; other ranks
    wait. -> (train token dir, eval token dir or None).

    The key is the CONTENT of the data files (size + sha256 of every byte: ~0.16 s per 100 MB,
    against minutes of tokenising), not their paths, plus everything else that shapes the
    samples: format, template and system prompt, tokenizer identity, split, fields, options.
    A file edited in place therefore gets new token files; moving a file keeps its cache. A
    split that leaves no eval record (fewer records than --eval-split) skips the eval with a
    one-line note. A failure leaves no empty folders behind.
    """
    data = list(data if data is not None else cfg.data)
    eval_data = list(eval_data if eval_data is not None else cfg.eval_data)
    if not data:
        raise TrainError("no training data: pass --data FILE [FILE ...]")
    def write():
        with writing("the token files", Path(cfg.out_dir) / "tokens"):  # a full disk: one line
            return _token_files(cfg, fmt, tokenizer, template, data, eval_data, options)
    dirs = distributed.on_main(write)
    return Path(dirs[0]), (Path(dirs[1]) if dirs[1] else None)


def _token_files(cfg, fmt, tokenizer, template, data, eval_data, options) -> tuple[str, str | None]:
    """Rank 0's part of token_files: -> (train dir, eval dir or None) as strings."""
    try:
        key = {"data": _contents(data), "eval": _contents(eval_data), "split": cfg.eval_split, "format": fmt,
               "template": template.name if template else None, "system": getattr(template, "system", None),
               "tokenizer": tokenizer_identity(tokenizer), "options": options, "text_field": cfg.text_field,
               "paragraphs": cfg.paragraphs, "version": VERSION}
    except (DataError, OSError) as err:
        raise TrainError(str(err)) from None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.out_dir) / "tokens" / f"{fmt}-{digest}"
    train_dir, eval_dir = root / "train", root / "eval"
    base = dict(format=fmt, template=cfg.template or None, text_field=cfg.text_field, paragraphs=cfg.paragraphs,
                **options)
    split = cfg.eval_split if not eval_data else 0
    try:
        _write_once(PrepareConfig(inputs=data, out=str(train_dir), **base), tokenizer, template,
                    (lambda i: i % split != split - 1) if split else None)
        if not (eval_data or split):
            return str(train_dir), None
        try:
            _write_once(PrepareConfig(inputs=eval_data or data, out=str(eval_dir), **base), tokenizer, template,
                        (lambda i: i % split == split - 1) if split else None)
        except NoSamples:
            if eval_data:
                raise
            print(f"note: {', '.join(data)} has fewer than --eval-split {split} records, so none is held out: "
                  "no eval loss (pass --eval-data FILE, or a smaller --eval-split)", flush=True)
            return str(train_dir), None
        return str(train_dir), str(eval_dir)
    except (DataError, ValueError, FileNotFoundError) as err:  # NoSamples and bad ids are ValueErrors
        raise TrainError(str(err)) from None
    finally:
        _remove_empty([eval_dir, train_dir, root, root.parent])


def _contents(paths: list[str]) -> list[dict]:
    """Size + sha256 of each file, in order (the paths themselves do not enter the key)."""
    return [{k: v for k, v in s.items() if k != "path"} for s in sources(paths)]


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first; a folder with anything in it stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def _write_once(pcfg: PrepareConfig, tokenizer, template, keep) -> None:
    if (Path(pcfg.out) / "meta.json").exists():
        return
    shutil.rmtree(pcfg.out, ignore_errors=True)  # a folder without meta.json is a killed write's leftover
    meta = prepare(pcfg, tokenizer, template, keep_record=keep, progress=False)
    print(f"tokenised {', '.join(pcfg.inputs)} -> {pcfg.out}: {meta['n_docs']} samples, "
          f"{meta['n_tokens']:,} tokens ({meta['n_loss_tokens']:,} with loss)", flush=True)


def loaders(cfg: RecipeConfig, train_dir: Path, eval_dir: Path | None, tokenizer, info: distributed.DistInfo):
    """Packed, rank-sharded, resumable batch loaders over the token files. A damaged token file or
    one written with another tokenizer is one TrainError line."""
    try:
        train = PackedDataset(TokenFile(train_dir), cfg.seq_len, tokenizer=tokenizer)
        evals = PackedDataset(TokenFile(eval_dir), cfg.seq_len, tokenizer=tokenizer) if eval_dir else None
    except (ValueError, FileNotFoundError) as err:
        raise TrainError(str(err)) from None
    if len(train) < cfg.micro_batch_size * info.world_size and info.is_main:
        print(f"note: {len(train)} blocks of {cfg.seq_len} tokens; batches repeat data within a step", flush=True)
    train_loader = BatchLoader(train, cfg.micro_batch_size, info.rank, info.world_size, seed=cfg.seed)
    eval_loader = None
    if evals is not None:
        eval_loader = BatchLoader(evals, cfg.micro_batch_size, info.rank, info.world_size, seed=cfg.seed,
                                  shuffle=False)
    return train_loader, eval_loader
