"""SafeCLIP phases 1 and 2: unimodal warm-up, then low-learning-rate CLIP warm-up.

Phase 1 (`unimodal_epochs`): each tower learns from its own modality only — two
augmented views per image, two EDA views per caption, InfoNCE between them
(nearest-neighbour positives from a memory bank by default). The towers never see
each other, so a poisoned image–caption pairing cannot be memorised.
Phase 2 (`clip_epochs`): the CLIP loss on all pairs at `clip_lr_scale` x the base
learning rate — enough to align the two spaces, too little to learn poisons.

A phase plan over the training engine (sanitize/train): each phase has its own
schedule over its own steps — linear warm-up (10% of the phase by default) to its base
rate (lr, or lr x clip_lr_scale), then a cosine to min_lr at the phase's last step. One
AdamW carries its moments across phases. The checkpoint is rewritten after every epoch
(and where `max_steps` stops the run), so `resume=True` continues from the last one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..io.artifacts import read_jsonl, side_paths, write_jsonl
from ..io.pairs import CsvOptions, open_pairs
from ..io.shards import atomic_write_json
from ..train import distributed
from ..train.augment import EDA
from ..train.batches import PairBatches, make_loader
from ..train.engine import EpochStats, Precision, StepCallback, Steps, run_epoch, skip_batches, tagged
from ..train.optim import lr_at
from ..train.state import Progress, TrainState, read_progress
from ..train.views import BatchViews
from .config import WarmupConfig

PHASES = ("unimodal", "clip")


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


def phase_schedules(config: WarmupConfig, data: PairBatches) -> tuple[dict[str, int], dict[str, Callable]]:
    """Steps per phase and each phase's learning rate by step (warm-up, then cosine)."""
    total = config.unimodal_epochs + config.clip_epochs
    epochs = {"unimodal": range(config.unimodal_epochs), "clip": range(config.unimodal_epochs, total)}
    steps = {p: sum(data.batches_per_epoch(e, config.num_workers) for e in es) for p, es in epochs.items()}

    def schedule(phase: str) -> Callable[[int], float]:
        n = max(1, steps[phase])
        base = config.lr * (config.clip_lr_scale if phase == "clip" else 1.0)
        warm = config.warmup_steps if config.warmup_steps is not None else n // 10
        return lambda step: lr_at(step, n, base, warm, config.min_lr * base / config.lr)

    return steps, {p: schedule(p) for p in PHASES}


def _open_state(out: Path, config: WarmupConfig, resume: bool, device: torch.device
                ) -> tuple[WarmupConfig, WarmupState, TrainState, dict | None]:
    """The config, position and training state to start from: saved ones on resume."""
    if not resume:
        config.validate()
        state = TrainState.create(config.model, config.pretrained, lr=config.lr, weight_decay=config.weight_decay,
                                  memory_bank=config.memory_bank, seed=config.seed, device=device)
        return config, WarmupState(), state, None
    if not out.exists():
        raise FileNotFoundError(f"{out}: nothing to resume (no checkpoint there yet)")
    saved = read_progress(out, "warmup")
    config = WarmupConfig.from_dict(saved.config)
    state, _ = TrainState.resume(out, lr=config.lr, weight_decay=config.weight_decay,
                                 memory_bank=config.memory_bank, device=device)
    return config, WarmupState(**saved.position), state, saved.source_shape


def _epoch_record(epoch: int, phase: str, phase_epoch: int, stats: EpochStats, state: TrainState,
                  position: WarmupState) -> dict:
    record = {"epoch": epoch, "phase": phase, "phase_epoch": phase_epoch, **stats.record(),
              "seconds": round(stats.seconds, 3), "logit_scale": float(state.model.logit_scale.detach().exp()),
              "global_step": position.global_step}
    losses = ("loss_image", "loss_text") if phase == "unimodal" else ("loss_clip",)
    record["loss"] = sum(record.get(name, math.nan) for name in losses)
    return record


def check_output(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """The checkpoint-path policy: a new warm-up needs a free path (`overwrite` frees it),
    `resume` needs a checkpoint there; the parent folder is made."""
    out = Path(out)
    if out.exists() and not (resume or overwrite):
        raise FileExistsError(f"{out} exists; pass --resume to continue it or --overwrite to start again")
    if resume and not out.exists():
        raise FileNotFoundError(f"{out}: nothing to resume (no checkpoint there yet)")
    out.parent.mkdir(parents=True, exist_ok=True)


def ignored_on_resume(out: str | os.PathLike, config: WarmupConfig) -> list[str]:
    """The options set away from their defaults in `config` that the checkpoint at `out`
    saved otherwise: a resume replays the saved ones, so these are ignored."""
    saved = read_progress(out, "warmup").config
    given, defaults = config.to_dict(), WarmupConfig().to_dict()
    return [k for k, v in given.items() if v != defaults.get(k) and k in saved and saved[k] != v]


def _write_stats(path: Path, src: str, out: Path, config: WarmupConfig, position: WarmupState, state: TrainState,
                 data: PairBatches, phase_steps: dict, device: torch.device, records: list[dict],
                 partial: dict | None) -> None:
    atomic_write_json(path, {
        "stage": "warmup", "source": str(src), "checkpoint": str(out), "finished": position.finished,
        "epochs_done": position.epochs_done, "global_step": position.global_step,
        "model": state.model_config.get("name"), "pairs_per_epoch": data.pairs_per_epoch(),
        "steps_per_phase": phase_steps, "config": config.to_dict(), "device": str(device),
        # Every epoch reads the same source, so its first epoch's skips are the source's.
        "source_skips": records[0]["skipped"] if records else {},
        "epochs": records,
        "unfinished_epoch": partial,  # where --max-steps stopped (timings for a fraction of an epoch)
    })


def run_warmup(src: str, out: str | os.PathLike, config: WarmupConfig, *, resume: bool = False,
               device: str = "auto", max_steps: int | None = None, source_format: str | None = None,
               threads: int | None = None, csv_options: CsvOptions | None = None,
               on_epoch_start: Callable[[str, int, int], None] | None = None,
               on_step: StepCallback | None = None, on_epoch_end: Callable[[dict], None] | None = None
               ) -> WarmupResult:
    """SafeCLIP phases 1–2 from pairs at `src` to a checkpoint at `out` (see the module
    doc); `max_steps` stops early with a checkpoint that `resume=True` continues."""
    out = Path(out)
    metrics_path, stats_path = side_paths(out)
    distributed.use_threads(threads, config.num_workers)
    dev = distributed.resolve_device(device)
    config, position, state, saved_shape = _open_state(out, config, resume, dev)
    precision = Precision.choose(config.precision, dev)
    source = open_pairs(src, format=source_format, csv_options=csv_options)
    data = PairBatches(source, state.tokenizer, state.image_size, config.batch_size, seed=config.seed, views=True,
                       plain=True, shuffle_buffer=config.shuffle_buffer, eda=EDA(alpha=config.eda_alpha),
                       crop_scale=config.crop_scale, views_here=dev.type == "cpu")
    if data.pairs_per_epoch() < 2:
        raise ValueError(f"{src}: need at least 2 pairs to train, found {data.pairs_per_epoch()}")
    shape = {"shards": len(source.shards), "pairs": data.pairs_per_epoch()}
    if saved_shape is not None and saved_shape != shape:
        raise ValueError(f"{src}: has {shape['pairs']} pairs in {shape['shards']} shards, but the checkpoint was "
                         f"trained on {saved_shape['pairs']} in {saved_shape['shards']}; resume needs the same data")
    phase_steps, schedules = phase_schedules(config, data)
    steps = Steps(state.model, dev, config.temperature, state.banks, views=BatchViews(state.image_size))

    def checkpoint() -> None:
        state.save(out, Progress("warmup", config.to_dict(), dataclasses.asdict(position), str(src), shape))

    records = [r for r in read_jsonl(metrics_path) if r.get("epoch", position.epochs_done) < position.epochs_done
               ] if resume else []
    partial = None
    budget = None if max_steps is None else max(0, max_steps - position.global_step)
    total_epochs = config.unimodal_epochs + config.clip_epochs
    while position.epochs_done < total_epochs and not position.finished and (budget is None or budget > 0):
        epoch = position.epochs_done
        phase, phase_epoch = phase_of(epoch, config)
        stats = EpochStats(**position.epoch_stats) if position.batches_in_epoch else EpochStats()
        data.set_epoch(epoch)
        data.views, data.plain = phase == "unimodal", phase == "clip"
        planned = data.batches_per_epoch(epoch, config.num_workers)
        if on_epoch_start is not None:
            on_epoch_start(phase, epoch, planned - position.batches_in_epoch)
        batches = tagged(skip_batches(make_loader(data, config.num_workers), position.batches_in_epoch), phase)
        taken = run_epoch(state.model, batches, state.optimizer, steps, schedules[phase], position.phase_step,
                          stats, precision=precision, grad_clip=config.grad_clip, max_batches=budget,
                          on_step=on_step)
        position.phase_step += taken
        position.global_step += taken
        position.batches_in_epoch += taken
        if budget is not None:
            budget -= taken
        if budget is not None and budget <= 0 and position.batches_in_epoch < planned:
            # Stopped mid-epoch: save exactly where we are, no metrics line yet.
            position.epoch_stats = dataclasses.asdict(stats)
            checkpoint()
            partial = {"epoch": epoch, "phase": phase, "planned_steps": planned, **stats.record(),
                       "seconds": round(stats.seconds, 3)}
            break
        record = _epoch_record(epoch, phase, phase_epoch, stats, state, position)
        records.append(record)
        position.epochs_done += 1
        position.batches_in_epoch, position.epoch_stats = 0, {}
        if phase_of(position.epochs_done, config)[0] != phase or position.epochs_done == total_epochs:
            position.phase_step = 0
        position.finished = position.epochs_done == total_epochs
        write_jsonl(metrics_path, records)
        checkpoint()
        if on_epoch_end is not None:
            on_epoch_end(record)

    _write_stats(stats_path, src, out, config, position, state, data, phase_steps, dev, records, partial)
    return WarmupResult(str(out), str(metrics_path), str(stats_path), records, position.finished,
                        position.global_step)
