"""AdamW with two parameter groups, and a cosine learning-rate schedule with linear warm-up.

Weight decay pulls weights toward zero. That regularises matrices, but on a norm's gain vector
(initialised at 1) or a bias it just fights the parameter's job, so 1-D parameters get none
(the GPT-2 / nanoGPT / HF Trainer convention). Only trainable parameters are handed to the
optimizer: frozen base weights under LoRA get no optimizer state at all.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into [{params: >=2-D, weight_decay}, {params: 1-D, weight_decay: 0}].

    A parameter shared by two modules (a tied head) appears once (named_parameters deduplicates).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (call after sharding: the optimizer must hold
    the sharded DTensor parameters, so each rank keeps state only for its own shard)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warm-up: lr * (step+1) / warmup_steps, so the first step already moves (a zero lr would waste it).
    Then cosine from lr down to min_lr, reached at the last step (max_steps - 1).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: int,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor makes every group's lr equal lr_at(step). Its state (last_epoch) is
    checkpointed; the schedule itself is a pure function of the step, so resume is exact."""
    if lr <= 0:
        raise ValueError(f"lr={lr} must be > 0")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, lr, min_lr, warmup_steps, max_steps) / lr)
