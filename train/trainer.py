"""The one training loop every method uses: FSDP2, per-token gradient accumulation, checkpoints.

    trainer = Trainer(model, config, train_loader, eval_loader=None, tokenizer=None)
    trainer.fit()

What happens, in order:
  1. The model (a plain `Llama`, possibly with LoRA applied and base weights frozen; then the
     LoRAConfig that apply_lora returned is passed as `lora`) gets activation checkpointing,
     compiled blocks and FSDP2 from outside (train/parallelize.py). With one process this is a
     one-rank group (train/distributed.py), so the same code runs at every world size (one CPU
     rank skips only the FSDP wrapping). The model computes its own summed loss
     (`Llama.forward(tokens, labels)`, fused head + cross-entropy) and knows nothing of this.
  2. AdamW (no decay on 1-D params) and a cosine schedule with warm-up (train/optim.py).
  3. Each optimizer step reads `grad_accum` micro-batches per rank. The loss of a step is the mean
     over *every loss token of the global batch*, so micro-batches and ranks holding more loss
     tokens weigh more (the trap: averaging per-micro-batch means gives each micro-batch equal
     weight, which changes the gradient whenever label masks differ). Concretely: count the loss
     tokens of the whole step across ranks first (one all-reduce), then backprop each micro-batch's
     *summed* loss divided by that global count, and let FSDP *sum* (not average) gradients over
     ranks. The result equals one big batch holding all micro-batches of all ranks.
  4. Gradient clipping on the global norm (DTensor-aware), a NaN/inf guard, metrics, periodic
     eval and checkpoints (train/checkpointing.py); at the end the merged model in HF format and,
     with LoRA, the adapter (model.checkpoint.export_trained).

Batches: any object with next_batch() -> {tokens[B,T], labels[B,T] (already shifted, -100 = no
loss), positions[B,T] (optional), segments[B,T] (optional)}, state_dict(), load_state_dict().
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from kernels import IGNORE_INDEX
from model.checkpoint import export_trained
from model.lora import LoRAConfig, lora_modules
from train import distributed, runlock
from train.cpu_heap import keep_freed_memory
from train.checkpointing import CheckpointManager, frozen_fingerprint, rng_state, set_rng_state
from train.config import TrainConfig, config_hash, hashed_fields, save_config
from train.errors import TrainError, TrainingDiverged, writing
from train.faults import fault_point, inject_nan, write_fault
from train.guard import DivergenceGuard
from train.optim import build_optimizer, build_scheduler
from train.parallelize import parallelize, precision_note


class Trainer:
    """Train `model` (a Llama, optionally with LoRA) on batches from `train_loader`.

    lora: the LoRAConfig apply_lora / load_adapter returned, for a model with LoRA layers (it
    decides what the adapter export holds); None for full fine-tuning.
    The model is parallelized in place; after fit() use the exported folders (out_dir/final,
    out_dir/adapter) or `full_state_dict()`. Pass dist_info from distributed.init() (or
    distributed.session()); without it the Trainer calls init() itself, which makes a one-rank
    group when none exists (close() ends it).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_loader, eval_loader=None,
                 tokenizer=None, dist_info: distributed.DistInfo | None = None, lora: LoRAConfig | None = None):
        if lora is None and lora_modules(model):
            raise ValueError("Trainer: the model has LoRA layers: pass lora=<the LoRAConfig apply_lora returned>")
        self.config = config
        self.train_loader, self.eval_loader, self.tokenizer = train_loader, eval_loader, tokenizer
        self.dist = dist_info or distributed.init()
        if self.dist.device.type == "cpu":
            keep_freed_memory()  # each step reuses the last one's pages (train/cpu_heap.py)
        self.out_dir = Path(config.out_dir)
        self.lm_config = model.config
        self.lora = lora
        self.lora_config = lora.peft() if lora else None  # as config.json and the run hash record it
        self.run_hash = config_hash(config, extra=self._model_identity(model))
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", config.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # wall seconds of earlier runs of this same training (resume)
        self._t0 = time.perf_counter()
        self.history: list[dict] = []  # every record written to metrics.jsonl by this process
        self.last_checkpoint: str | None = None

        self.guard = DivergenceGuard(config.guard_loss_factor, config.guard_grad_factor, config.guard_stall_steps,
                                     config.warmup_steps)
        self._write_error: str | None = None  # a failed metrics write on this rank, raised at the next step

        runlock.hold(self.out_dir)  # before anything in out_dir is touched
        self._clean_export_leftovers()
        resume_from = self._check_out_dir()

        # Master weights and optimizer state in fp32 (the compute dtype is the plan's: FSDP's policy or autocast).
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model.float()
        self.plan = parallelize(model, self.dist.device, config.mixed_precision, config.activation_checkpointing,
                                config.compile)
        self.model = model
        self.model.train()
        # Frozen weights never change during a run: fingerprint them once, for every checkpoint.
        self.frozen_fingerprint = frozen_fingerprint(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay,
                                         (config.beta1, config.beta2), config.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, config.lr, config.min_lr, config.warmup_steps,
                                         config.max_steps)
        torch.manual_seed(config.seed + self.dist.rank)  # dropout differs across ranks, as data does

        if resume_from:
            self._resume(resume_from)
        else:  # a fresh run: drop the curve of an earlier attempt that never checkpointed
            self._on_main("the metrics", self.out_dir / "metrics.jsonl", _truncate_metrics,
                          self.out_dir / "metrics.jsonl", 0, fault="metrics")
        self._on_main("the run config", self.out_dir / "config.json", save_config, config, self.out_dir / "config.json",
                      {"config_hash": self.run_hash, "world_size": self.dist.world_size,
                       "model": self.lm_config.to_hf(), "lora": self.lora_config})

    # ---- setup -----------------------------------------------------------------------------
    def _model_identity(self, model: nn.Module) -> dict:
        """What, besides the config, makes two runs different: the model's shape and LoRA setup."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"model": self.lm_config.to_hf(), "lora": self.lora_config, "trainable": trainable}

    def _on_main(self, what: str, path: Path, fn, *args, fault: str = ""):
        """fn(*args) on rank 0 only; a write error there is one TrainError on every rank (collective).
        fault: the name of this write for train/faults.write_fault (tests)."""
        def write():
            with writing(what, path):
                write_fault(fault, self.step, path)
                fn(*args)
        distributed.on_main(write)

    def _clean_export_leftovers(self) -> None:
        """A run killed during its final export leaves `.final.tmp-*` (the half-written model) and
        maybe `.final.old-*` (the previous export, moved aside): remove the first, and put the
        second back when no `final/` replaced it (rank 0; collective)."""
        def clean():
            for leftover in sorted(self.out_dir.iterdir()):
                for kept in ("final", "adapter"):
                    if leftover.name.startswith(f".{kept}.old-") and not (self.out_dir / kept).exists():
                        os.replace(leftover, self.out_dir / kept)
                        tqdm.write(f"note: restored {self.out_dir / kept} from {leftover.name} (an export was "
                                   "interrupted)")
                    elif leftover.name.startswith((f".{kept}.tmp-", f".{kept}.old-")):
                        shutil.rmtree(leftover, ignore_errors=True)
                        tqdm.write(f"note: removed {leftover}, left by an interrupted export")
            for stale in (self.out_dir / "adapter").glob("*.tmp"):
                stale.unlink(missing_ok=True)
        self._on_main("the run folder", self.out_dir, clean)

    def _check_out_dir(self) -> str | None:
        """Decide (rank 0, broadcast) whether to start fresh or resume; refuse a foreign out_dir.
        Resume takes the newest checkpoint that passes verification; a damaged newer one is moved
        aside to damaged-step_* with one line saying why (collective)."""
        self.checkpoints.clean_partial()  # a crash mid-save leaves a temp folder: never used, removed
        latest = self.checkpoints.latest()
        if latest and not self.config.resume:
            raise TrainError(f"{self.out_dir} already holds a checkpoint ({Path(latest).name}); pass --resume to "
                             f"continue that run, or choose a new --out-dir")
        if not latest:
            return None
        intact, damaged = self.checkpoints.newest_intact()
        if intact is None:
            reasons = "; ".join(f"{f.name}: {why}" for f, why in damaged)
            raise TrainError(f"{self.out_dir}: no intact checkpoint to resume from ({reasons}); move "
                             f"{self.checkpoints.root} away to start over")

        def set_aside_and_match():
            for folder, why in damaged:
                moved = self.checkpoints.set_aside(folder)
                print(f"warning: checkpoint {folder.name} is damaged ({why}): moved to {moved.name}; "
                      f"resuming from {intact.name}", file=sys.stderr, flush=True)
            meta = CheckpointManager.read_meta(intact)
            if meta.get("config_hash") != self.run_hash:
                diff = _diff(meta.get("config", {}), hashed_fields(self.config))
                raise TrainError(f"{self.out_dir} holds a checkpoint of a different run (config hash "
                                 f"{meta.get('config_hash')} != {self.run_hash}{'; ' + diff if diff else ''}); "
                                 f"choose a new --out-dir")
        self._on_main("the checkpoints", self.checkpoints.root, set_aside_and_match)
        return str(intact)

    def _resume(self, folder: str) -> None:
        rank_state, meta = self.checkpoints.load(folder, self.model, self.optimizer, self.frozen_fingerprint)
        self.scheduler.load_state_dict(rank_state["scheduler"])
        try:
            self.train_loader.load_state_dict(rank_state["train_loader"])
        except ValueError as err:  # other data, seed or batch shape than the checkpoint's run
            raise TrainError(f"cannot resume from {folder}: {err}") from None
        set_rng_state(rank_state["rng"])
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.elapsed_before = meta["elapsed"]
        self.last_checkpoint = folder
        self._on_main("the metrics", self.out_dir / "metrics.jsonl", _truncate_metrics,
                      self.out_dir / "metrics.jsonl", self.step)
        if self.dist.is_main:
            tqdm.write(f"resumed from {folder} (step {self.step})")

    # ---- one step --------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        """The summed loss of one micro-batch (fp32 scalar), in the plan's precision."""
        with self.plan.autocast():
            return self.model(batch["tokens"], batch["labels"], positions=batch.get("positions"),
                              segments=batch.get("segments"), loss_chunk_size=self.config.loss_chunk_size)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches per rank. Returns its metrics."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        micro = [self.train_loader.next_batch() for _ in range(cfg.grad_accum)]
        # [loss tokens, all tokens] of the whole global step, known before any backward (counted
        # on the host batches: no device sync).
        # The third entry rides along for free: a rank whose metrics write failed makes every rank stop.
        counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro),
                               sum(b["tokens"].numel() for b in micro), int(self._write_error is not None)],
                              dtype=torch.int64)
        counts = distributed.all_reduce_sum(counts.to(self.dist.device)).cpu()
        if counts[2]:
            raise TrainError(self._write_error or "another rank could not write its files (see rank 0's message)")
        micro = [self._to_device(b) for b in micro]
        n_loss_tokens = counts[0].clamp(min=1).to(device=self.dist.device, dtype=torch.float32)
        loss_total = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        for batch in micro:
            loss_sum = self._loss_sum(batch)
            # d(sum_i loss_i / N_global) summed over micro-batches and (by FSDP) ranks = the
            # gradient of the mean loss over all N_global loss tokens of the step.
            (loss_sum / n_loss_tokens).backward()
            loss_total += loss_sum.detach()
        distributed.all_reduce_sum(loss_total)
        loss = (loss_total / n_loss_tokens).item()
        if inject_nan(self.step + 1):
            loss = float("nan")
        # clip_grad_norm_ on DTensor gradients computes the norm over all shards (a collective).
        # max_norm=inf returns the norm and scales by exactly 1.0.
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        grad_norm = float(distributed.full_tensor(grad_norm))
        # Loss and norm are global (all-reduced), so every rank takes the same decision here,
        # before the optimizer applies the step.
        problem = self.guard.check(self.step + 1, loss, grad_norm)
        if problem:
            raise TrainingDiverged(self._diverged_message(problem))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += int(counts[1])
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(counts[1]),
                "loss_tokens": int(counts[0])}

    def _diverged_message(self, problem: str) -> str:
        """One line: the step, what went wrong, and the newest checkpoint that passes verification
        (rank 0 checks the files; other ranks' messages are never printed)."""
        if not self.dist.is_main:
            return f"step {self.step + 1}: {problem}; stopping (see rank 0)"
        verified = self.checkpoints.newest_verified_local()
        where = f"the last verified checkpoint is {verified}" if verified else "no verified checkpoint exists yet"
        return f"step {self.step + 1}: {problem}; stopping ({where})"

    # ---- eval ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per loss token over eval_batches micro-batches per rank (all ranks), or None.

        The eval source is rewound afterwards (state_dict / load_state_dict), so every eval sees
        the same batches and eval losses are comparable across steps.
        """
        if self.eval_loader is None:
            return None
        saved = self.eval_loader.state_dict()
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for _ in range(self.config.eval_batches):
            batch = self._to_device(self.eval_loader.next_batch())
            totals[0] += self._loss_sum(batch).double()
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
        distributed.all_reduce_sum(totals)
        # A forward without backward leaves FSDP2's root unsharded (it reshards in post-backward):
        # reshard, so that nothing after an eval (a checkpoint, its fingerprint, memory) sees the
        # parameters in another layout than after a training step.
        distributed.reshard(self.model)
        self.model.train()
        self.eval_loader.load_state_dict(saved)
        return float(totals[0] / totals[1].clamp(min=1))

    # ---- checkpoints and export --------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        rank_state = {"scheduler": self.scheduler.state_dict(), "train_loader": self.train_loader.state_dict(),
                      "rng": rng_state()}
        meta = {"config_hash": self.run_hash, "config": hashed_fields(self.config),
                "frozen_fingerprint": self.frozen_fingerprint,
                "tokens_seen": self.tokens_seen, "elapsed": self._elapsed()}
        path = self.checkpoints.save(self.step, self.model, self.optimizer, rank_state, meta)
        self.last_checkpoint = str(path)
        return path

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole (unsharded) model as HF-named CPU tensors on rank 0, None elsewhere (collective)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.dist.is_main else None

    def export(self) -> dict[str, str]:
        """Write out_dir/final (HF model, LoRA merged in) and, with LoRA, out_dir/adapter (PEFT
        layout). A write error is one TrainError on every rank; the checkpoint stays the result."""
        state = self.full_state_dict()
        written: dict[str, str] = {}
        self._on_main("the exported model", self.out_dir / "final", self._write_export, state, written,
                      fault="export")
        return written

    def _write_export(self, state: dict, written: dict) -> None:
        written.update(export_trained(state, self.lm_config, self.tokenizer, self.out_dir / "final",
                                      self.lora, self.out_dir / "adapter"))

    # ---- the loop --------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._t0

    def _log(self, record: dict) -> None:
        """Append to metrics.jsonl (rank 0). A write error is kept and stops every rank at the next
        step (train_step) or at the end (fit), instead of leaving the others waiting."""
        self.history.append(record)
        if self.dist.is_main and self._write_error is None:
            path = self.out_dir / "metrics.jsonl"
            try:
                with writing("the metrics", path):
                    write_fault("metrics", record["step"], path)
                    with open(path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            except TrainError as err:
                self._write_error = str(err)

    def fit(self, on_step=None) -> dict:
        """Train to config.max_steps (from the resumed step), checkpoint, export. Returns a summary.

        on_step(trainer): called on every rank after each optimizer step (after its logging, eval
        and checkpoint), e.g. by a study that measures the model along the way."""
        cfg = self.config
        self._t0 = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            n_all = sum(p.numel() for p in self.model.parameters())
            n_train = sum(p.numel() for p in self.params)
            tqdm.write(f"training {n_train:,} of {n_all:,} parameters on {self.dist.world_size} rank(s), "
                       f"{cfg.grad_accum} micro-batch(es) per rank per step, {self.plan.describe()}, "
                       f"run {self.run_hash}")
            note = precision_note(self.plan.dtype, self.dist.device)
            if note:
                tqdm.write(note)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.dist.is_main and cfg.progress),
                   dynamic_ncols=True, desc="train")
        eval_loss = None
        try:
            while self.step < cfg.max_steps:
                t = time.perf_counter()
                m = self.train_step()
                dt = time.perf_counter() - t
                record = {"step": self.step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                          "tokens": self.tokens_seen, "loss_tokens": m["loss_tokens"],
                          "tokens_per_s": m["tokens"] / dt, "elapsed": self._elapsed()}
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens'] / dt:,.0f}", lr=f"{m['lr']:.2e}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        self._log({"step": self.step, "eval_loss": eval_loss, "elapsed": self._elapsed()})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
                fault_point("kill_at_step", self.step)
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()
        self._stop_on_write_error()
        if self.eval_loader is not None:
            eval_loss = self.evaluate()
            self._log({"step": self.step, "eval_loss": eval_loss, "elapsed": self._elapsed()})
        self._stop_on_write_error()
        if not self.last_checkpoint or Path(self.last_checkpoint).name != f"step_{self.step:08d}":
            self.save_checkpoint()
        exported = self.export() if cfg.export else {}
        losses = [r["loss"] for r in self.history if "loss" in r]
        return {"step": self.step, "loss": losses[-1] if losses else None,
                "eval_loss": eval_loss, "checkpoint": self.last_checkpoint, **exported}

    def _stop_on_write_error(self) -> None:
        error = distributed.first_error(self._write_error)
        if error:
            raise TrainError(error)

    def close(self) -> None:
        """End the process group if this Trainer created it."""
        distributed.teardown(self.dist)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (logged by the run that died), so the file holds
    one clean curve."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _diff(old: dict, new: dict) -> str:
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")


def run_main(main_fn, *args, **kwargs):
    """Run main_fn(*args, **kwargs); a TrainError becomes one line on stderr, printed by rank 0
    only, and exit code 1 on every rank. The run folder's lock is released either way.

    Under torchrun the launcher adds its own ChildFailedError report after any non-zero exit of
    a worker (it cannot be turned off from inside the worker); `python -m train.launch` is
    torchrun without that report, passing the workers' exit code on (train/launch.py)."""
    try:
        return main_fn(*args, **kwargs)
    except TrainError as err:
        rank = distributed.dist.get_rank() if distributed.dist.is_initialized() else int(os.environ.get("RANK", 0))
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        if distributed.dist.is_initialized():
            distributed.dist.destroy_process_group()
        sys.exit(1)
    finally:
        runlock.release_all()
