"""What a training run carries from step to step and across a resume.

`TrainState` is the model with its tokenizer and config, the AdamW optimizer, the
NNCLR memory banks and the device. `Progress` is the typed part of a checkpoint's
training state: which stage wrote it, with which config, how far it got and on what
data. `TrainState.save` writes both plus every RNG state; `TrainState.resume` rebuilds
all of it, so a resumed run ends in the weights an uninterrupted run would have.

On disk the training state keeps the keys it has always had (`warmup_config` and
`warmup_state` for the warm-up, `pretrain_config`, `epoch` and `global_step` for
pretrain), so checkpoints written before this module read the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, rng_state, save_checkpoint, \
    set_rng_state
from ..models.factory import create_model
from .losses import MemoryBank
from .optim import make_optimizer

STAGES = ("warmup", "pretrain")


@dataclass
class Progress:
    """A checkpoint's training state, typed. `position` is the stage's own resume point:
    the warm-up's WarmupState fields, or pretrain's {"epoch", "global_step"}."""

    stage: str
    config: dict
    position: dict
    source: str
    source_shape: dict
    safe_ratio: float | None = None

    def to_payload(self) -> dict:
        if self.stage == "warmup":
            head = {"warmup_config": self.config, "warmup_state": self.position}
        else:
            head = {"pretrain_config": self.config, **self.position}
        return {"stage": self.stage, **head, "source": self.source, "source_shape": self.source_shape,
                "safe_ratio": self.safe_ratio}

    @classmethod
    def from_payload(cls, payload: dict, path: str | os.PathLike = "checkpoint") -> "Progress":
        stage = payload.get("stage")
        if stage == "warmup":
            config, position = payload.get("warmup_config", {}), payload.get("warmup_state", {})
        elif stage == "pretrain":
            config = payload.get("pretrain_config", {})
            position = {"epoch": int(payload.get("epoch", -1)), "global_step": int(payload.get("global_step", 0))}
        else:
            raise CheckpointError(f"{path}: not a training checkpoint (stage {stage!r})")
        return cls(stage, config, position, str(payload.get("source", "")), dict(payload.get("source_shape", {})),
                   payload.get("safe_ratio"))


def read_progress(path: str | os.PathLike, stage: str | None = None) -> Progress:
    """The Progress of a checkpoint, checked to come from `stage` when given."""
    progress = Progress.from_payload(read_checkpoint(path)["training_state"], path)
    if stage is not None and progress.stage != stage:
        raise CheckpointError(f"{path}: not a {stage.replace('warmup', 'warm-up')} checkpoint "
                              f"(stage {progress.stage!r})")
    return progress


@dataclass
class TrainState:
    model: torch.nn.Module
    model_config: dict
    tokenizer: Callable[..., torch.Tensor]
    image_size: int
    optimizer: torch.optim.Optimizer
    device: torch.device
    banks: dict[str, MemoryBank] = field(default_factory=dict)

    @classmethod
    def create(cls, model: str, pretrained: str | None, *, lr: float, weight_decay: float, memory_bank: int,
               seed: int, device: torch.device) -> "TrainState":
        """A fresh model (seeded init: the only draw from the global generator) and optimizer."""
        torch.manual_seed(seed)
        net, tokenizer, image_size, config = create_model(model, pretrained)
        return cls._assemble(net, config, tokenizer, image_size, lr, weight_decay, memory_bank, device)

    @classmethod
    def resume(cls, path: str | os.PathLike, *, lr: float, weight_decay: float, memory_bank: int,
               device: torch.device, optimizer: bool = True) -> tuple["TrainState", Progress]:
        """The state saved at `path`: weights, and unless `optimizer=False` the optimizer
        moments, memory banks and RNG states (a run continues exactly where it stopped)."""
        net, tokenizer, image_size, config, payload = load_checkpoint(path)
        state = cls._assemble(net, config, tokenizer, image_size, lr, weight_decay, memory_bank, device)
        if optimizer:
            state.optimizer.load_state_dict(payload["optimizer"])
            for name, bank in state.banks.items():
                if payload.get("banks"):
                    bank.load_state_dict(payload["banks"][name])
            set_rng_state(payload["rng"])
        return state, Progress.from_payload(payload, path)

    @classmethod
    def _assemble(cls, net, config, tokenizer, image_size, lr, weight_decay, memory_bank, device) -> "TrainState":
        net.to(device)
        banks = ({m: MemoryBank(memory_bank, int(config["embed_dim"])).to(device) for m in ("image", "text")}
                 if memory_bank else {})
        return cls(net, config, tokenizer, image_size, make_optimizer(net, lr, weight_decay), device, banks)

    def save(self, path: str | os.PathLike, progress: Progress) -> None:
        save_checkpoint(path, self.model, self.model_config, training_state={
            **progress.to_payload(),
            "optimizer": self.optimizer.state_dict(),
            "banks": {m: b.state_dict() for m, b in self.banks.items()},
            "rng": rng_state(),
        })
