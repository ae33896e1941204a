"""The training engine every phase runs on: precision, the loss of one batch, one epoch.

A batch is a dict from `PairBatches` tagged with its loss (`batch["loss"]`):
  "clip"      CLIP's loss: on a plain pair (`image`, `text`), or SafeCLIP's
              cross-augmented loss on two views (`image1/2`, `text1/2`): image view 1
              against caption view 2 and the reverse.
  "unimodal"  InfoNCE between the two views of each modality (nearest-neighbour
              positives from a memory bank, NNCLR); the towers never see each other.
`Steps` computes either through the model's forward (the DDP wrapper under torchrun,
so gradients are all-reduced) with one CLIP loss that gathers features across ranks.
`run_epoch` is the loop: learning rate, autocast, backward, clip, step, logit-scale clamp.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .distributed import Dist
from .losses import MAX_LOGIT_SCALE, MemoryBank, clamp_logit_scale_, clip_loss, cross_clip_loss, unimodal_loss
from .optim import set_lr
from .views import BatchViews

LOSSES = ("clip", "unimodal")
StepCallback = Callable[[int, dict[str, float], float], None]  # (pairs in batch, losses, lr)


@dataclass
class Precision:
    """Autocast settings for one device. bf16 autocast on CUDA when supported; fp32 on
    CPU unless asked (bf16 autocast on CPU is slower than fp32 for these small models)."""

    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def choose(cls, name: str, device: torch.device) -> "Precision":
        if name == "auto":
            name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if name == "fp16" and device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None
        return cls(device.type, dtype, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class Steps:
    """The loss of one tagged batch. `keep`, when a dict, collects the embeddings of every pair
    trained as a plain pair, by key (scoring from the training pass). `zero_scale_grad` gives the
    logit scale a zero gradient in unimodal steps, which DDP needs (every parameter must
    get one) and which single-process phase 3 keeps so one and many processes train alike."""

    def __init__(self, net: torch.nn.Module, device: torch.device, temperature: float,
                 banks: dict[str, MemoryBank] | None, *, ctx: Dist | None = None, local_loss: bool = False,
                 zero_scale_grad: bool = False, keep: dict | None = None, views: BatchViews | None = None):
        self.net, self.device, self.temperature, self.banks = net, device, temperature, banks or {}
        self.ctx, self.local_loss = ctx or Dist(), local_loss
        self.zero_scale_grad, self.keep, self.views = zero_scale_grad, keep, views

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        n = len(batch["key"])
        plain = "image" in batch and batch["loss"] == "clip"
        if not plain and "image_u8" in batch:  # the workers left the image views to this device
            batch["image1"], batch["image2"] = self.views(batch["image_u8"].to(self.device, non_blocking=True),
                                                          batch["view_params"].to(self.device, non_blocking=True))
        images = batch["image"] if plain else torch.cat([batch["image1"], batch["image2"]])
        texts = batch["text"] if plain else torch.cat([batch["text1"], batch["text2"]])
        out = self.net(images.to(self.device, non_blocking=True), texts.to(self.device, non_blocking=True))
        # open_clip's forward: normalised image and text features, exp(logit_scale)
        image, text, scale = out[0].float(), out[1].float(), out[2].float().clamp(max=MAX_LOGIT_SCALE)
        if self.keep is not None and plain:  # the pair as the scoring pass sees it: reusable as its score
            image1, text1 = image[:n].detach().cpu().numpy(), text[:n].detach().cpu().numpy()
            for i, key in enumerate(batch["key"]):
                self.keep[key] = (image1[i], text1[i])
        if batch["loss"] == "clip":
            common = dict(ctx=self.ctx, local_loss=self.local_loss)
            loss = (clip_loss(image, text, scale, **common) if plain else
                    cross_clip_loss(image[:n], image[n:], text[:n], text[n:], scale, **common))
            return loss, {"loss_clip": loss.item()}
        loss_image = unimodal_loss(image[:n], image[n:], self.temperature, self.banks.get("image"))
        loss_text = unimodal_loss(text[:n], text[n:], self.temperature, self.banks.get("text"))
        loss = loss_image + loss_text + (0.0 * scale if self.zero_scale_grad else 0.0)
        return loss, {"loss_image": loss_image.item(), "loss_text": loss_text.item()}


@dataclass
class EpochStats:
    """Running sums for one epoch; part of the checkpoint so a mid-epoch resume
    reports the same epoch metrics as an uninterrupted run."""

    steps: int = 0
    pairs: int = 0
    seconds: float = 0.0
    loss_sums: dict = field(default_factory=dict)
    skips: dict = field(default_factory=dict)
    lr: float = 0.0

    def add(self, parts: dict[str, float], n: int) -> None:
        self.steps += 1
        self.pairs += n
        for name, value in parts.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.loss_sums.items()}

    def record(self) -> dict:
        """The epoch's metrics line fields common to every phase."""
        return {"steps": self.steps, "pairs": self.pairs, "lr_last": self.lr, "skipped": self.skips,
                "pairs_per_s": round(self.pairs / self.seconds, 2) if self.seconds else None, **self.means()}


def run_epoch(model: torch.nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
              loss_fn: Callable[[dict], tuple[torch.Tensor, dict[str, float]]],
              lr_for_step: Callable[[int], float], first_step: int, stats: EpochStats, *,
              precision: Precision, grad_clip: float | None = None, max_batches: int | None = None,
              on_step: StepCallback | None = None) -> int:
    """Train on `batches`; returns the number of optimizer steps taken. Stops early
    after `max_batches` steps (an interrupted run), leaving `stats` resumable."""
    model.train()
    step = first_step
    taken = 0
    started = time.perf_counter()
    for batch in batches:
        if max_batches is not None and taken >= max_batches:
            break
        for reason, count in batch.get("skips", {}).items():
            stats.skips[reason] = stats.skips.get(reason, 0) + count
        n = len(batch["key"])
        if n == 0:
            continue
        lr = lr_for_step(step)
        set_lr(optimizer, lr)
        with precision.autocast():
            loss, parts = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if precision.scaler is not None:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        clamp_logit_scale_(model.logit_scale)
        step += 1
        taken += 1
        stats.add(parts, n)
        stats.lr = lr
        if on_step is not None:
            on_step(n, parts, lr)
    stats.seconds += time.perf_counter() - started
    return taken


# ---- streams of batches ----------------------------------------------------------------------

def tagged(batches: Iterable[dict], loss: str, limit: int | None = None) -> Iterator[dict]:
    """Up to `limit` non-empty batches tagged with their loss; the skip counts of empty
    batches (a shard's unreadable tail) ride along with the next real one."""
    pending: dict = {}
    given = 0
    for batch in batches:
        for reason, count in batch.get("skips", {}).items():
            pending[reason] = pending.get(reason, 0) + count
        if not batch["key"]:
            continue
        if limit is not None and given >= limit:
            break
        batch["skips"], pending = pending, {}
        batch["loss"] = loss
        given += 1
        yield batch


def skip_batches(batches: Iterable[dict], count: int) -> Iterator[dict]:
    """Drop the first `count` real batches (already trained on before an interruption),
    keeping their skip counts out of the metrics twice."""
    it = iter(batches)
    seen = 0
    while seen < count:
        batch = next(it, None)
        if batch is None:
            return
        if batch["key"]:
            seen += 1
    yield from it


def interleave_plan(counts: dict[str, int]) -> list[str]:
    """Which stream each step draws from: every stream spread evenly over the epoch in
    proportion to its batch count — the next step goes to the stream furthest behind in
    its share (ties: the earlier stream). Deterministic."""
    names = [name for name, n in counts.items() if n > 0]
    taken = dict.fromkeys(names, 0)
    plan: list[str] = []
    for _ in range(sum(counts[name] for name in names)):
        best = None
        for name in names:
            if taken[name] >= counts[name]:
                continue
            # taken/count smaller than best's, compared without division
            if best is None or taken[name] * counts[best] < taken[best] * counts[name]:
                best = name
        plan.append(best)
        taken[best] += 1
    return plan


def interleave(streams: dict[str, Iterator[dict]], plan: list[str]) -> Iterator[dict]:
    for name in plan:
        batch = next(streams[name], None)
        if batch is not None:
            yield batch
