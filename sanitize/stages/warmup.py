"""SafeCLIP phases 1 and 2: unimodal warm-up, then low-learning-rate CLIP warm-up.

Phase 1 (`unimodal_epochs`): each tower learns from its own modality only — two
augmented views per image, two EDA views per caption, InfoNCE between them
(nearest-neighbour positives from a memory bank by default). The towers never see
each other, so a poisoned image–caption pairing cannot be memorised.
Phase 2 (`clip_epochs`): the CLIP loss on all pairs at `clip_lr_scale` x the base
learning rate — enough to align the two spaces, too little to learn poisons.

Each phase has its own schedule over its own steps: linear warm-up (10% of the
phase by default) to its base rate (lr, or lr x clip_lr_scale), then a cosine to
min_lr at the phase's last step. One AdamW carries its moments across phases.

The epoch functions (`train_unimodal_epoch`, `train_clip_epoch`) are the building
blocks `pretrain` reuses; `run_warmup` is the whole stage: plan, loop, checkpoint
after every epoch, resume from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..train.augment import EDA
from ..models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..train.losses import MemoryBank, clamp_logit_scale_, clip_loss, cross_clip_loss, unimodal_loss
from ..models.factory import create_model, encode_pairs
from ..train.optim import lr_at, make_optimizer, set_lr
from ..io.pairs import CsvOptions, open_pairs
from ..io.shards import atomic_write_bytes, atomic_write_json
from ..train.batches import PairBatches, make_loader

PHASES = ("unimodal", "clip")


@dataclass
class WarmupConfig:
    """Every knob of the warm-up; saved in the checkpoint so a resume replays it exactly."""

    model: str = "safeclip-tiny-vit"
    pretrained: str | None = None
    unimodal_epochs: int = 5
    clip_epochs: int = 1
    batch_size: int = 128
    lr: float = 5e-4
    clip_lr_scale: float = 0.01
    weight_decay: float = 0.1
    warmup_steps: int | None = None     # per phase; None: 10% of the phase's steps
    min_lr: float = 0.0
    temperature: float = 0.1             # unimodal InfoNCE temperature (SimCLR/NNCLR's 0.1)
    memory_bank: int = 4096              # NNCLR bank size per modality; 0 = in-batch InfoNCE
    eda_alpha: float = 0.1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    shuffle_buffer: int = 2000
    precision: str = "auto"              # auto | fp32 | bf16 | fp16
    grad_clip: float | None = None
    seed: int = 0
    num_workers: int = 0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "WarmupConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "crop_scale" in values:
            values["crop_scale"] = tuple(values["crop_scale"])
        return cls(**values)

    def validate(self) -> None:
        if self.unimodal_epochs < 0 or self.clip_epochs < 0 or self.unimodal_epochs + self.clip_epochs == 0:
            raise ValueError("need at least one unimodal or CLIP epoch (and none negative)")
        if self.batch_size < 2:
            raise ValueError("batch size must be >= 2 for contrastive losses")
        if self.lr <= 0 or self.clip_lr_scale <= 0 or self.temperature <= 0:
            raise ValueError("lr, clip-lr-scale and temperature must be > 0")
        if self.memory_bank < 0:
            raise ValueError("memory bank size must be >= 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError("precision must be auto, fp32, bf16 or fp16")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError("crop scale must satisfy 0 < low <= high <= 1")


# ---- mixed precision -------------------------------------------------------------------

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


# ---- one step of each loss --------------------------------------------------------------

def unimodal_step(model: torch.nn.Module, batch: dict, device: torch.device, temperature: float,
                  banks: dict[str, MemoryBank] | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Image and text InfoNCE between their two views; the towers stay apart."""
    images = torch.cat([batch["image1"], batch["image2"]]).to(device, non_blocking=True)
    texts = torch.cat([batch["text1"], batch["text2"]]).to(device, non_blocking=True)
    n = len(batch["key"])
    image_emb, text_emb = encode_pairs(model, images, texts)
    image_emb, text_emb = image_emb.float(), text_emb.float()
    loss_image = unimodal_loss(image_emb[:n], image_emb[n:], temperature, banks["image"] if banks else None)
    loss_text = unimodal_loss(text_emb[:n], text_emb[n:], temperature, banks["text"] if banks else None)
    return loss_image + loss_text, {"loss_image": loss_image.item(), "loss_text": loss_text.item()}


def clip_step(model: torch.nn.Module, batch: dict, device: torch.device, cross: bool = False
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """CLIP loss on plain pairs, or SafeCLIP's cross-augmented variant on views."""
    if cross:
        images = torch.cat([batch["image1"], batch["image2"]]).to(device, non_blocking=True)
        texts = torch.cat([batch["text1"], batch["text2"]]).to(device, non_blocking=True)
        n = len(batch["key"])
        image_emb, text_emb = (e.float() for e in encode_pairs(model, images, texts))
        loss = cross_clip_loss(image_emb[:n], image_emb[n:], text_emb[:n], text_emb[n:], model.logit_scale)
    else:
        image_emb, text_emb = (e.float() for e in encode_pairs(
            model, batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True)))
        loss = clip_loss(image_emb, text_emb, model.logit_scale)
    return loss, {"loss_clip": loss.item()}


# ---- one epoch ---------------------------------------------------------------------------

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


StepCallback = Callable[[int, dict[str, float], float], None]  # (pairs in batch, losses, lr)


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


def train_unimodal_epoch(model: torch.nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
                         lr_for_step: Callable[[int], float], first_step: int, stats: EpochStats, *,
                         device: torch.device, temperature: float, banks: dict[str, MemoryBank] | None,
                         precision: Precision, grad_clip: float | None = None,
                         max_batches: int | None = None, on_step: StepCallback | None = None) -> int:
    """One epoch of SafeCLIP's unimodal loss (batches need image1/2, text1/2)."""
    return run_epoch(model, batches, optimizer, lambda b: unimodal_step(model, b, device, temperature, banks),
                     lr_for_step, first_step, stats, precision=precision, grad_clip=grad_clip,
                     max_batches=max_batches, on_step=on_step)


def train_clip_epoch(model: torch.nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
                     lr_for_step: Callable[[int], float], first_step: int, stats: EpochStats, *,
                     device: torch.device, precision: Precision, cross: bool = False,
                     grad_clip: float | None = None, max_batches: int | None = None,
                     on_step: StepCallback | None = None) -> int:
    """One epoch of the CLIP loss: plain pairs (batches need image/text) or, with
    `cross`, SafeCLIP's cross-augmented views (image1/2, text1/2)."""
    return run_epoch(model, batches, optimizer, lambda b: clip_step(model, b, device, cross),
                     lr_for_step, first_step, stats, precision=precision, grad_clip=grad_clip,
                     max_batches=max_batches, on_step=on_step)


# ---- the warm-up stage --------------------------------------------------------------------

@dataclass
class WarmupState:
    """Where the warm-up is: epochs done overall, steps done in the current phase,
    and the current epoch's partial progress."""

    epochs_done: int = 0          # over both phases
    phase_step: int = 0           # optimizer steps done in the current phase
    global_step: int = 0
    batches_in_epoch: int = 0     # of the current (unfinished) epoch
    epoch_stats: dict = field(default_factory=dict)
    finished: bool = False


@dataclass
class WarmupResult:
    checkpoint: str
    metrics_path: str
    stats_path: str
    epochs: list[dict]
    finished: bool
    global_step: int


def phase_of(epoch: int, config: WarmupConfig) -> tuple[str, int]:
    """(phase, epoch index inside the phase) for an overall epoch index."""
    if epoch < config.unimodal_epochs:
        return "unimodal", epoch
    return "clip", epoch - config.unimodal_epochs


def side_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Metrics JSONL and stats JSON beside the checkpoint: warm.pt -> warm_metrics.jsonl, warm_stats.json."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return Path(f"{stem}_metrics.jsonl"), Path(f"{stem}_stats.json")


def _read_metrics(path: Path, keep_epochs: int) -> list[dict]:
    """Metric lines of completed epochs (an interrupted run may have written one more)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("epoch", keep_epochs) < keep_epochs:
            lines.append(record)
    return lines


def _write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def _skip(batches: Iterable[dict], count: int) -> Iterator[dict]:
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


def run_warmup(src: str, out: str | os.PathLike, config: WarmupConfig, *, resume: bool = False,
               device: str = "auto", max_steps: int | None = None, source_format: str | None = None,
               threads: int | None = None, csv_options: CsvOptions | None = None,
               on_epoch_start: Callable[[str, int, int], None] | None = None,
               on_step: StepCallback | None = None, on_epoch_end: Callable[[dict], None] | None = None
               ) -> WarmupResult:
    """SafeCLIP phases 1–2 from pairs at `src` to a checkpoint at `out`.

    The checkpoint is rewritten after every epoch (and when `max_steps` stops the
    run early), so `resume=True` continues from the last one — with the saved
    config, data order and RNG states, ending in the same weights as an
    uninterrupted run."""
    out = Path(out)
    metrics_path, stats_path = side_paths(out)
    if threads:
        # On a shared CPU box, intra-op threads beyond the free cores spin and wait:
        # 2 threads on 2 busy cores measured 4-6x slower per step than 1.
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)

    state = WarmupState()
    saved = None
    if resume:
        if not out.exists():
            raise CheckpointError(f"{out}: nothing to resume (no checkpoint there yet)")
        payload = read_checkpoint(out)
        saved = payload["training_state"]
        if saved.get("stage") != "warmup":
            raise CheckpointError(f"{out}: not a warm-up checkpoint (stage {saved.get('stage')!r})")
        config = WarmupConfig.from_dict(saved["warmup_config"])
        state = WarmupState(**saved["warmup_state"])
        model, tokenizer, image_size, model_cfg, _ = load_checkpoint(out)
    else:
        config.validate()
        torch.manual_seed(config.seed)  # model init is the only draw from the global generator
        model, tokenizer, image_size, model_cfg = create_model(config.model, config.pretrained)
    model.to(dev)
    precision = Precision.choose(config.precision, dev)

    source = open_pairs(src, format=source_format, csv_options=csv_options)
    data = PairBatches(source, tokenizer, image_size, config.batch_size, seed=config.seed, views=True,
                       plain=True, shuffle_buffer=config.shuffle_buffer,
                       eda=EDA(alpha=config.eda_alpha), crop_scale=config.crop_scale)
    if data.pairs_per_epoch() < 2:
        raise ValueError(f"{src}: need at least 2 pairs to train, found {data.pairs_per_epoch()}")

    shape = {"shards": len(source.shards), "pairs": data.pairs_per_epoch()}
    if saved is not None and saved.get("source_shape", shape) != shape:
        old = saved["source_shape"]
        raise ValueError(f"{src}: has {shape['pairs']} pairs in {shape['shards']} shards, but the checkpoint "
                         f"was trained on {old['pairs']} in {old['shards']}; resume needs the same data")

    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    embed_dim = int(model_cfg["embed_dim"])
    banks = ({m: MemoryBank(config.memory_bank, embed_dim).to(dev) for m in ("image", "text")}
             if config.memory_bank else None)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        if banks:
            for m, bank in banks.items():
                bank.load_state_dict(saved["banks"][m])
        set_rng_state(saved["rng"])

    total_epochs = config.unimodal_epochs + config.clip_epochs
    phase_epochs = {"unimodal": range(config.unimodal_epochs),
                    "clip": range(config.unimodal_epochs, total_epochs)}
    phase_steps = {p: sum(data.batches_per_epoch(e, config.num_workers) for e in epochs)
                   for p, epochs in phase_epochs.items()}

    def schedule(phase: str) -> Callable[[int], float]:
        total = max(1, phase_steps[phase])
        base = config.lr * (config.clip_lr_scale if phase == "clip" else 1.0)
        warm = config.warmup_steps if config.warmup_steps is not None else total // 10
        return lambda step: lr_at(step, total, base, warm, config.min_lr * base / config.lr)

    def checkpoint() -> None:
        save_checkpoint(out, model, model_cfg, training_state={
            "stage": "warmup",
            "warmup_config": config.to_dict(),
            "warmup_state": dataclasses.asdict(state),
            "optimizer": optimizer.state_dict(),
            "banks": {m: b.state_dict() for m, b in banks.items()} if banks else {},
            "rng": rng_state(),
            "safe_ratio": None,  # set by pretrain's split schedule; none during warm-up
            "source": str(src),
            "source_shape": shape,
        })

    records = _read_metrics(metrics_path, state.epochs_done) if resume else []
    partial = None
    budget = None if max_steps is None else max(0, max_steps - state.global_step)
    while state.epochs_done < total_epochs and not state.finished:
        epoch = state.epochs_done
        phase, phase_epoch = phase_of(epoch, config)
        if budget is not None and budget <= 0:
            break
        stats = EpochStats(**state.epoch_stats) if state.batches_in_epoch else EpochStats()
        data.set_epoch(epoch)
        data.views, data.plain = phase == "unimodal", phase == "clip"
        planned = data.batches_per_epoch(epoch, config.num_workers)
        if on_epoch_start is not None:
            on_epoch_start(phase, epoch, planned - state.batches_in_epoch)
        batches = _skip(make_loader(data, config.num_workers), state.batches_in_epoch)
        common = dict(precision=precision, grad_clip=config.grad_clip, max_batches=budget, on_step=on_step)
        first = state.phase_step
        if phase == "unimodal":
            taken = train_unimodal_epoch(model, batches, optimizer, schedule(phase), first, stats, device=dev,
                                         temperature=config.temperature, banks=banks, **common)
        else:
            taken = train_clip_epoch(model, batches, optimizer, schedule(phase), first, stats, device=dev,
                                     **common)
        state.phase_step += taken
        state.global_step += taken
        state.batches_in_epoch += taken
        if budget is not None:
            budget -= taken
        if budget is not None and budget <= 0 and state.batches_in_epoch < planned:
            # Stopped mid-epoch: save exactly where we are, no metrics line yet.
            state.epoch_stats = dataclasses.asdict(stats)
            checkpoint()
            partial = {"epoch": epoch, "phase": phase, "steps": stats.steps, "pairs": stats.pairs,
                       "planned_steps": planned, "seconds": round(stats.seconds, 3),
                       "pairs_per_s": round(stats.pairs / stats.seconds, 2) if stats.seconds else None,
                       **stats.means()}
            break
        record = {"epoch": epoch, "phase": phase, "phase_epoch": phase_epoch, "steps": stats.steps,
                  "pairs": stats.pairs, "lr_last": stats.lr, "seconds": round(stats.seconds, 3),
                  "pairs_per_s": round(stats.pairs / stats.seconds, 2) if stats.seconds else None,
                  "logit_scale": float(model.logit_scale.detach().exp()), "skipped": stats.skips,
                  "global_step": state.global_step, **stats.means()}
        if phase == "unimodal":
            record["loss"] = record.get("loss_image", math.nan) + record.get("loss_text", math.nan)
        else:
            record["loss"] = record.get("loss_clip", math.nan)
        records.append(record)
        state.epochs_done += 1
        state.batches_in_epoch = 0
        state.epoch_stats = {}
        if phase_of(state.epochs_done, config)[0] != phase or state.epochs_done == total_epochs:
            state.phase_step = 0
        state.finished = state.epochs_done == total_epochs
        _write_metrics(metrics_path, records)
        checkpoint()
        if on_epoch_end is not None:
            on_epoch_end(record)

    atomic_write_json(stats_path, {
        "stage": "warmup", "source": str(src), "checkpoint": str(out), "finished": state.finished,
        "epochs_done": state.epochs_done, "global_step": state.global_step,
        "model": model_cfg.get("name"), "pairs_per_epoch": data.pairs_per_epoch(),
        "steps_per_phase": phase_steps, "config": config.to_dict(), "device": str(dev),
        # Every epoch reads the same source, so its first epoch's skips are the source's.
        "source_skips": records[0]["skipped"] if records else {},
        "epochs": records,
        "unfinished_epoch": partial,  # where --max-steps stopped (timings for a fraction of an epoch)
    })
    return WarmupResult(str(out), str(metrics_path), str(stats_path), records, state.finished, state.global_step)
