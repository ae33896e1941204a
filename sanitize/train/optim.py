"""Optimizer and learning-rate schedule.

AdamW with open_clip's weight-decay rule: no decay on 1-D parameters (norm
gains, biases, class embeddings), on norm layers, or on the logit scale.
Schedule: linear warm-up, then a cosine that reaches `min_lr` exactly at the last
step (the official SafeCLIP code's cosine keeps going past pi; ours stops at it).
"""

from __future__ import annotations

import math

import torch


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's exclusion rule (open_clip_train's `exclude`)."""
    return (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
            or "logit_scale" in name)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            {"params": decay, "weight_decay": weight_decay, "name": "decay"}]


def make_optimizer(model: torch.nn.Module, lr: float = 5e-4, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """SafeCLIP's reference optimizer: AdamW (0.9, 0.999), wd 0.1, lr 5e-4."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warm-up rises linearly to base_lr at step `warmup_steps`; the cosine then
    decays to min_lr at step `total_steps - 1`, the last step taken. Steps past
    the end stay at min_lr."""
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
