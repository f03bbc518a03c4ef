"""What every method's entry point shares: the model and data fields of its config, and the steps
from flags to a ready Trainer (load model -> adapters -> token files -> loaders).

train/inscp.py and train/transllm.py subclass `RecipeConfig`; each flag maps onto one field.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.loader import BatchLoader, PackedDataset
from data.prepare import PrepareConfig, prepare
from data.readers import DataError
from data.tokenfile import TokenFile, tokenizer_identity
from model.lora import ALL_LINEAR, apply_lora
from train import distributed
from train.config import TrainConfig, _meta
from train.errors import TrainError


@dataclass
class RecipeConfig(TrainConfig):
    model: str = field(default="", metadata=_meta("HF folder or .gguf to start from (default: SmolLM2-135M-Instruct GGUF)"))
    data: list[str] = field(default_factory=list, metadata=_meta("training data files (.txt / .jsonl)"))
    eval_data: list[str] = field(default_factory=list, metadata=_meta(
        "held-out data files; none: every eval_split-th record of --data is held out instead"))
    eval_split: int = field(default=20, metadata=_meta("without --eval_data hold out every N-th record; 0 = no eval"))
    template: str = field(default="", metadata=_meta("chat template llama2 | llama3 | chatml (default: detected)"))
    text_field: str = field(default="text", metadata=_meta("text field of .jsonl text files"))
    paragraphs: bool = field(default=False, metadata=_meta(".txt files: blank-line separated documents (default: one per line)"))
    seq_len: int = field(default=512, metadata=_meta("tokens per packed block"))
    micro_batch_size: int = field(default=4, metadata=_meta("blocks per micro-batch per rank"))
    finetune: str = field(default="lora", metadata=_meta("lora | full"))
    lora_r: int = field(default=16, metadata=_meta("LoRA rank"))
    lora_alpha: float = field(default=32.0, metadata=_meta("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_meta("dropout on the LoRA path"))
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR), metadata=_meta(
        "linear layers that get adapters"))
    trainable_modules: list[str] = field(default_factory=list, metadata=_meta(
        "modules trained in full beside LoRA, e.g. embed_tokens lm_head"))
    device: str = field(default="", metadata=_meta("cpu | cuda (default: cuda when present)", hash=False))

    def __post_init__(self):
        super().__post_init__()
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"--finetune {self.finetune!r}: choose lora or full")


def load_model(cfg: RecipeConfig):
    """-> (Llama in fp32 on CPU, tokenizer); the Trainer moves it to the device when sharding."""
    from model import assets
    from model.checkpoint import load
    path = cfg.model or str(assets.smollm2_gguf())
    try:
        model, tokenizer = load(path, dtype=torch.float32)
    except (FileNotFoundError, ValueError) as err:
        raise TrainError(f"--model: {err}") from None
    if cfg.seq_len > model.config.max_seq_len:
        raise TrainError(f"--seq_len {cfg.seq_len} is above the model's context of {model.config.max_seq_len} "
                         f"tokens ({path}): pass --seq_len {model.config.max_seq_len} or less")
    return model, tokenizer


def add_adapters(model, cfg: RecipeConfig):
    """LoRA from outside the model (or nothing, for full fine-tuning). The seed makes every rank
    draw the same A matrices."""
    if cfg.finetune == "lora":
        torch.manual_seed(cfg.seed)
        apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.trainable_modules)
    return model


def token_files(cfg: RecipeConfig, fmt: str, tokenizer, template, info: distributed.DistInfo,
                data: list[str] | None = None, eval_data: list[str] | None = None, **options) -> tuple[Path, Path | None]:
    """Tokenise the data once (rank 0) into out_dir/tokens/<hash>/{train,eval}; other ranks wait.
    A folder whose inputs, format and tokenizer match is reused (resume, repeated runs).
    -> (train token dir, eval token dir or None)."""
    data = list(data if data is not None else cfg.data)
    eval_data = list(eval_data if eval_data is not None else cfg.eval_data)
    if not data:
        raise TrainError("no training data: pass --data FILE [FILE ...]")
    key = {"data": data, "eval": eval_data, "split": cfg.eval_split, "format": fmt, "template": template.name
           if template else None, "tokenizer": tokenizer_identity(tokenizer), "options": options,
           "text_field": cfg.text_field, "paragraphs": cfg.paragraphs}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.out_dir) / "tokens" / f"{fmt}-{digest}"
    train_dir, eval_dir = root / "train", root / "eval"
    has_eval = bool(eval_data) or cfg.eval_split > 0
    if info.is_main:
        base = dict(format=fmt, template=cfg.template or None, text_field=cfg.text_field,
                    paragraphs=cfg.paragraphs, **options)
        split = cfg.eval_split if not eval_data else 0
        try:
            _write_once(PrepareConfig(inputs=data, out=str(train_dir), **base), tokenizer, template,
                        (lambda i: i % split != split - 1) if split else None)
            if has_eval:
                _write_once(PrepareConfig(inputs=eval_data or data, out=str(eval_dir), **base), tokenizer, template,
                            (lambda i: i % split == split - 1) if split else None)
        except (DataError, FileNotFoundError) as err:
            raise TrainError(str(err)) from None
    distributed.barrier()
    return train_dir, (eval_dir if has_eval else None)


def _write_once(pcfg: PrepareConfig, tokenizer, template, keep) -> None:
    if (Path(pcfg.out) / "meta.json").exists():
        return
    meta = prepare(pcfg, tokenizer, template, keep_record=keep, progress=False)
    print(f"tokenised {', '.join(pcfg.inputs)} -> {pcfg.out}: {meta['n_docs']} samples, "
          f"{meta['n_tokens']:,} tokens ({meta['n_loss_tokens']:,} with loss)", flush=True)


def loaders(cfg: RecipeConfig, train_dir: Path, eval_dir: Path | None, tokenizer, info: distributed.DistInfo):
    """Packed, rank-sharded, resumable batch loaders over the token files."""
    train = PackedDataset(TokenFile(train_dir), cfg.seq_len, tokenizer=tokenizer)
    if len(train) < cfg.micro_batch_size * info.world_size:
        print(f"note: {len(train)} blocks of {cfg.seq_len} tokens; batches repeat data within a step", flush=True)
    train_loader = BatchLoader(train, cfg.micro_batch_size, info.rank, info.world_size, seed=cfg.seed)
    eval_loader = None
    if eval_dir is not None:
        evals = PackedDataset(TokenFile(eval_dir), cfg.seq_len, tokenizer=tokenizer)
        eval_loader = BatchLoader(evals, cfg.micro_batch_size, info.rank, info.world_size, seed=cfg.seed,
                                  shuffle=False)
    return train_loader, eval_loader
