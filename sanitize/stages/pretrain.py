"""`safeclip pretrain`: the warm-up, then one epoch loop over a defense.

Phases 1–2 are `safeclip warmup` itself (`run_warmup`, writing RUN/warmup.pt), so the
warm-up has one implementation, one checkpoint format and one resume logic. Then, for
each later epoch, the defense (sanitize/defenses) says which split the epoch uses and
which pairs train with which loss; this module does the work:
  1. score every pair and split (when the defense asks for a new split): a separate
     no-grad pass or the previous epoch's training-pass embeddings (stages/scoring.py),
     then `safeclip split`'s own code into RUN/splits/epoch=K/;
  2. one training pass: the defense's streams (every pair, or a partition of the split,
     each with its loss) as full-size batches interleaved in proportion to their sizes,
     each optimizer step one loss on one batch (train/engine.py). The CLIP loss so keeps
     its full batch of negatives even when its partition is small, and every pair is
     seen exactly once per epoch;
  3. zero-shot accuracy when asked, a checkpoint RUN/checkpoints/epoch_KKKK.pt (atomic,
     the newest `keep` kept) and the epoch's line in RUN/metrics.jsonl.

Resume restarts the interrupted epoch from the newest checkpoint; data order and
augmentations are functions of (seed, epoch, shard, position), so a resumed run ends in
the weights of an uninterrupted one. Under torchrun every rank trains its share of the
shards (DDP); rank 0 alone runs the warm-up and the mixture fit while the others wait.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..defenses import Defense, SplitRequest, Stream, make_defense
from ..io.artifacts import Run, Split, read_jsonl, side_paths
from ..io.pairs import PairSource, open_pairs, subset_source
from ..io.shards import atomic_write_bytes
from ..models.checkpoint import CheckpointError
from ..train import distributed
from ..train.augment import EDA
from ..train.batches import PairBatches, make_loader
from ..train.distributed import Dist, barrier, broadcast_object, gather_object
from ..train.engine import LOSSES, EpochStats, Precision, Steps, interleave, interleave_plan, run_epoch, tagged
from ..train.optim import lr_at
from ..train.state import Progress, TrainState, read_progress
from ..train.views import BatchViews
from .config import PretrainConfig
from .scoring import score_pass, scores_from_training


@dataclass
class Hooks:
    """Progress callbacks (the CLI's bars); all optional."""

    warmup_epoch_start: Callable | None = None
    step: Callable | None = None
    epoch_start: Callable[[str, int, int], None] | None = None
    score_batch: Callable[[int], None] | None = None
    stage: Callable[[str, int], None] | None = None
    epoch_end: Callable[[dict], None] | None = None


@dataclass
class PretrainResult:
    run: str
    epochs: list[dict]
    finished: bool
    last_checkpoint: str | None


@dataclass
class Session:
    """Everything one pretrain run holds between epochs."""

    src: str
    run: Run
    config: PretrainConfig
    defense: Defense
    source: PairSource
    ctx: Dist
    state: TrainState
    net: torch.nn.Module                 # the model, or its DDP wrapper under torchrun
    precision: Precision
    hooks: Hooks
    shape: dict
    steps_per_epoch: int
    total_steps: int
    first_epoch: int
    records: list[dict] = field(default_factory=list)
    last_checkpoint: str | None = None
    full: dict = field(default_factory=dict)   # PairBatches over every pair, by `plain`
    kept: dict | None = None                   # this epoch's plain-pair embeddings (score from training)

    def lr(self, step: int) -> float:
        w = self.config.warmup
        warm = w.warmup_steps if w.warmup_steps is not None else self.total_steps // 10
        return lr_at(step, self.total_steps, w.lr, warm, w.min_lr)


def run_pretrain(src: str, run: str | os.PathLike, config: PretrainConfig, *, resume: bool = False,
                 ctx: Dist | None = None, device: str = "auto", source_format: str | None = None,
                 threads: int | None = None, hooks: Hooks | None = None, warmup_from: str | None = None,
                 stop_after_epoch: int | None = None, max_steps_per_epoch: int | None = None) -> PretrainResult:
    """Train from pairs at `src` into the run folder `run` (see the module doc).
    `warmup_from` takes phases 1–2 from a finished warm-up checkpoint (`adopt_warmup`).
    `stop_after_epoch` ends the run after that overall epoch and `max_steps_per_epoch`
    cuts each phase-3 epoch short (benchmarks: time a fraction of an epoch)."""
    started = time.perf_counter()
    distributed.use_threads(threads, config.warmup.num_workers)
    session = open_session(src, Run(run), config, resume=resume, ctx=ctx or Dist(), device=device,
                           source_format=source_format, hooks=hooks or Hooks(), warmup_from=warmup_from)
    for epoch in range(session.first_epoch, session.config.epochs):
        if stop_after_epoch is not None and epoch > stop_after_epoch:
            break
        record = train_epoch(session, epoch, max_steps_per_epoch)
        finish_epoch(session, epoch, record)
    return finish_run(session, time.perf_counter() - started)


# ---- opening a run --------------------------------------------------------------------------

def prepare_run_folder(out: str | os.PathLike, *, resume: bool, overwrite: bool, ctx: Dist | None = None) -> None:
    """The run-folder policy: a new run needs an empty or absent folder (`overwrite` empties
    it), `resume` needs one. Rank 0 decides and every rank raises alike under torchrun."""
    ctx = ctx or Dist()
    out, problem = Path(out), None
    if ctx.is_main:
        if out.exists() and not out.is_dir():
            problem = f"{out} is a file; --out names a run folder"
        elif out.exists() and any(out.iterdir()) and not resume:
            if not overwrite:
                problem = f"{out} holds a run; pass --resume to continue it or --overwrite to start again"
            else:
                shutil.rmtree(out)
        elif resume and not out.exists():
            problem = f"{out}: nothing to resume (no run there yet)"
    problem = broadcast_object(ctx, problem)
    barrier(ctx)
    if problem:
        raise FileExistsError(problem)


def _saved_config(run: Run) -> tuple[PretrainConfig, Progress | None]:
    """The config a resumed run replays: its newest checkpoint's, else config.json."""
    latest = run.latest_checkpoint()
    if latest is not None:
        progress = read_progress(latest, "pretrain")
        return PretrainConfig.from_dict(progress.config), progress
    if run.config.exists():
        return PretrainConfig.from_dict(run.read_config()), None
    raise CheckpointError(f"{run.root}: nothing to resume (no pretrain run there yet)")


def adopt_warmup(warmup: str | os.PathLike, run: Run, config: PretrainConfig) -> None:
    """Copy a finished warm-up (`safeclip warmup`, or another run's RUN/warmup.pt) into
    this run, so ablations on the same data share phases 1–2 instead of repeating them.
    Its settings must equal this run's warm-up settings (workers aside): the run then
    ends exactly as if it had trained the warm-up itself."""
    progress = read_progress(warmup, "warmup")
    if not progress.position.get("finished"):
        raise CheckpointError(f"{warmup}: the warm-up did not finish; resume it first")
    theirs, ours = dict(progress.config), config.warmup.to_dict()
    differ = sorted(k for k in set(theirs) | set(ours) if k != "num_workers" and theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"{warmup}: trained with other warm-up settings ("
                         + ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in differ) + ")")
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run.warmup, Path(warmup).read_bytes())
    for theirs_side, ours_side in zip(side_paths(warmup), side_paths(run.warmup)):
        if theirs_side.exists():
            atomic_write_bytes(ours_side, theirs_side.read_bytes())


def _warm_up(session_args: dict, run: Run, config: PretrainConfig, resume: bool, ctx: Dist) -> list[dict]:
    """Phases 1–2 on rank 0 (`safeclip warmup`'s own code), or the finished ones already
    in the run; returns their metric lines."""
    from .warmup import run_warmup

    if run.warmup.exists() and read_progress(run.warmup, "warmup").position.get("finished"):
        records = [dict(r, stage="warmup") for r in read_jsonl(side_paths(run.warmup)[0])]
        if ctx.is_main:
            run.write_metrics(records)
        return broadcast_object(ctx, records)
    if run.warmup.exists() and not resume:
        raise FileExistsError(f"{run.warmup}: an unfinished warm-up is there; pass --resume")
    records = None
    if ctx.is_main:  # under torchrun the other ranks wait: the warm-up is single-process code
        result = run_warmup(session_args["src"], run.warmup, config.warmup, resume=run.warmup.exists(),
                            device=session_args["device"], source_format=session_args["source_format"],
                            on_epoch_start=session_args["hooks"].warmup_epoch_start,
                            on_step=session_args["hooks"].step)
        records = [dict(r, stage="warmup") for r in result.epochs]
        run.write_metrics(records)
    barrier(ctx)
    return broadcast_object(ctx, records)


def open_session(src: str, run: Run, config: PretrainConfig, *, resume: bool, ctx: Dist, device: str,
                 source_format: str | None, hooks: Hooks, warmup_from: str | None) -> Session:
    """Config, data, warm-up and training state of a new or resumed run."""
    saved = None
    if resume:
        config, saved = _saved_config(run)
    config.validate()
    defense = make_defense(config)
    source = open_pairs(src, format=source_format)  # a bad source fails before RUN is touched
    if warmup_from and not defense.warms_up:
        raise ValueError(f"--warmup-from does not apply to --defense {defense.name} (it has no warm-up)")
    if warmup_from and saved is None and not run.warmup.exists():
        if ctx.is_main:
            adopt_warmup(warmup_from, run, config)
        barrier(ctx)
    if ctx.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        run.write_config(config.to_dict())
    barrier(ctx)
    records = run.read_metrics() if resume else []
    dev = distributed.resolve_device(device, ctx)
    if defense.warms_up and saved is None:
        records = _warm_up(dict(src=src, device=str(dev), source_format=source_format, hooks=hooks), run, config,
                           resume, ctx)
    state, saved = _training_state(run, config, defense, saved, dev)
    net = state.model
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    session = Session(src, run, config, defense, source, ctx, state, net,
                      Precision.choose(config.warmup.precision, dev), hooks, {}, 0, 0,
                      defense.warm_epochs if saved is None else int(saved.position["epoch"]) + 1, records,
                      str(run.latest_checkpoint()) if saved is not None else
                      str(run.warmup) if defense.warms_up else None)
    _plan_steps(session, saved)
    return session


def _training_state(run: Run, config: PretrainConfig, defense: Defense, saved: Progress | None,
                    device: torch.device) -> tuple[TrainState, Progress | None]:
    """Where phase 3 starts: the newest checkpoint (resume), the finished warm-up, or a fresh model."""
    w = config.warmup
    bank = w.memory_bank if defense.trains_unimodal else 0
    if saved is not None:
        state, _ = TrainState.resume(run.latest_checkpoint(), lr=w.lr, weight_decay=w.weight_decay,
                                     memory_bank=bank, device=device)
        return state, saved
    if defense.warms_up:
        state, _ = TrainState.resume(run.warmup, lr=w.lr, weight_decay=w.weight_decay, memory_bank=bank,
                                     device=device)
        return state, None
    return TrainState.create(w.model, w.pretrained, lr=w.lr, weight_decay=w.weight_decay, memory_bank=bank,
                             seed=w.seed, device=device), None


def _plan_steps(session: Session, saved: Progress | None) -> None:
    """Phase 3's LR schedule, fixed before any split: per epoch, the steps of the largest
    per-rank share of shards, plus one for the second stream's partial batch."""
    full = full_batches(session, plain=True)
    counts = full.shard_counts()
    n_pairs = full.pairs_per_epoch() if session.ctx.world_size == 1 else sum(counts)
    if n_pairs < 2:
        raise ValueError(f"{session.src}: need at least 2 pairs to train, found {n_pairs}")
    session.shape = {"shards": len(session.source.shards), "pairs": sum(counts)}
    if saved is not None and saved.source_shape and saved.source_shape != session.shape:
        raise ValueError(f"{session.src}: not the data this run was trained on "
                         f"({saved.source_shape} vs {session.shape})")
    descending = sorted(counts, reverse=True)
    largest_share = sum(descending[:math.ceil(len(descending) / session.ctx.world_size)])
    session.steps_per_epoch = math.ceil(largest_share / session.config.warmup.batch_size) + 1
    session.total_steps = max(1, (session.config.epochs - session.defense.warm_epochs) * session.steps_per_epoch)


# ---- one epoch ---------------------------------------------------------------------------------

def full_batches(session: Session, plain: bool) -> PairBatches:
    """Batches over every pair (made once per view kind: counting a source's pairs can read it)."""
    if plain not in session.full:
        other = next(iter(session.full.values()), None)
        session.full[plain] = _batches(session, session.source, plain,
                                       shard_counts=other.shard_counts() if other else None)
    return session.full[plain]


def _batches(session: Session, source: PairSource, plain: bool, shard_counts: list[int] | None = None
             ) -> PairBatches:
    w = session.config.warmup
    return PairBatches(source, session.state.tokenizer, session.state.image_size, w.batch_size, seed=w.seed,
                       views=not plain, plain=plain, shuffle_buffer=w.shuffle_buffer, eda=EDA(alpha=w.eda_alpha),
                       crop_scale=w.crop_scale, rank=session.ctx.rank, world_size=session.ctx.world_size,
                       shard_counts=shard_counts, views_here=session.state.device.type == "cpu")


def use_split(session: Session, request: SplitRequest, epoch: int, record: dict, seconds: dict) -> Split:
    """The epoch's split: made now (score every pair, then split) or an earlier one again."""
    from .split import split

    ctx, run, config = session.ctx, session.run, session.config
    if request.at != epoch:
        part = run.split(request.at)
        record.update({"split": str(part.root), "safe_ratio": broadcast_object(
            ctx, part.manifest().safe_share if ctx.is_main else None)})
        return part
    scores = run.scores(epoch)
    from_training = request.from_training and scores.is_finished()
    if not from_training:
        if session.hooks.stage:
            session.hooks.stage(f"epoch {epoch + 1} scoring", session.shape["pairs"] // ctx.world_size)
        seconds["score"] = round(score_pass(
            session.source, session.state.model, session.state.tokenizer, session.state.image_size, scores,
            batch_size=config.score_batch_size, dtype=config.score_dtype, num_workers=config.warmup.num_workers,
            ctx=ctx, device=session.state.device, checkpoint=session.last_checkpoint or "",
            on_batch=session.hooks.score_batch), 3)
    record["scored_by"] = "training pass" if from_training else "separate pass"
    t = time.perf_counter()
    manifest = None
    if ctx.is_main:
        previous = run.split(request.previous).root if request.previous is not None else None
        manifest = split(scores.root, run.split(epoch).root, request.schedule, epoch=request.schedule_epoch,
                         fit_sample=config.fit_sample, seed=config.warmup.seed, previous=previous,
                         ranking=request.ranking, force=True, dedup=request.dedup or None,
                         dedup_groups=(run.split(request.groups_from).root if request.groups_from is not None
                                       else None)).manifest
    manifest = broadcast_object(ctx, manifest)
    seconds["split"] = round(time.perf_counter() - t, 3)
    record.update({"safe_ratio": manifest.counts["safe_share"], "ratio": manifest.ratio,
                   "n_safe": manifest.counts["safe"], "n_risky": manifest.counts["risky"],
                   "mixture": manifest.mixture, "separation": manifest.separation, "split": str(run.split(epoch).root)})
    if manifest.warnings:
        record["split_warnings"] = manifest.warnings
    return run.split(epoch)


def stream_batches(session: Session, stream: Stream, split: Split | None) -> PairBatches | None:
    """A stream's batches, or None when its partition is empty."""
    if stream.partition is None:
        return full_batches(session, stream.plain)
    keys = broadcast_object(session.ctx, split.keys(stream.partition) if session.ctx.is_main else None)
    if not sum(len(v) for v in keys.values()):
        return None
    return _batches(session, subset_source(session.source, keys), stream.plain)


def _batches_for(data: PairBatches, epoch: int, num_workers: int, ctx: Dist) -> int:
    """Steps this stream takes: DDP steps all ranks in lockstep with the same loss, so
    every rank takes the minimum over ranks (a rank with one batch more skips its
    last one this epoch; the shard order changes every epoch)."""
    per_rank = []
    for rank in range(ctx.world_size):
        data.rank = rank
        per_rank.append(data.batches_per_epoch(epoch, num_workers))
    data.rank = ctx.rank
    return min(per_rank)


def train_epoch(session: Session, epoch: int, max_steps: int | None = None) -> dict:
    """Split if the defense asks, then one pass over its streams; returns the metrics line."""
    defense, config, ctx = session.defense, session.config, session.ctx
    k = epoch - defense.warm_epochs  # the index inside phase 3 = the schedule's epoch
    record: dict = {"epoch": epoch, "stage": "pretrain", "phase": defense.name, "phase_epoch": k,
                    "clip_views": "plain" if defense.plain_clip else "cross"}
    seconds: dict[str, float] = {}
    request = defense.split_for(epoch)
    split = use_split(session, request, epoch, record, seconds) if request is not None else None
    streams, losses = {}, {}
    for stream in defense.streams(epoch, split):
        data = stream_batches(session, stream, split)
        if data is not None:
            data.set_epoch(epoch)
            streams[stream.name], losses[stream.name] = data, stream.loss
    counts = {name: _batches_for(data, epoch, config.warmup.num_workers, ctx) for name, data in streams.items()}
    plan = interleave_plan(counts)
    batches = {name: tagged(make_loader(data, config.warmup.num_workers), losses[name], counts[name])
               for name, data in streams.items()}
    if session.hooks.epoch_start:
        session.hooks.epoch_start(defense.name, epoch, len(plan))
    following = defense.split_for(epoch + 1) if epoch + 1 < config.epochs else None
    session.kept = {} if following is not None and following.from_training else None
    w = config.warmup
    steps = Steps(session.net, session.state.device, w.temperature, session.state.banks, ctx=ctx,
                  local_loss=config.local_loss, zero_scale_grad=True, keep=session.kept,
                  views=BatchViews(session.state.image_size))
    stats = EpochStats()
    first_step = k * session.steps_per_epoch
    taken = run_epoch(session.state.model, interleave(batches, plan), session.state.optimizer, steps, session.lr,
                      first_step, stats, precision=session.precision, grad_clip=w.grad_clip, max_batches=max_steps,
                      on_step=session.hooks.step)
    seconds["train"] = round(stats.seconds, 3)
    all_pairs = gather_object(ctx, stats.pairs)  # each rank trained on its own share
    stats.pairs = sum(all_pairs) if all_pairs else stats.pairs
    done = [losses[name] for name in plan[:taken]]
    record.update({**stats.record(), "logit_scale": float(session.state.model.logit_scale.detach().exp()),
                   "planned_steps": len(plan), "global_step": first_step + taken,
                   **{f"steps_{loss}": done.count(loss) for loss in LOSSES}})
    record["seconds"] = seconds
    return record


def finish_epoch(session: Session, epoch: int, record: dict) -> None:
    """Next epoch's scores from this pass (when kept), evaluation, checkpoint and metrics."""
    from ..evaluation.evaluate import zero_shot_top1

    ctx, run, config, seconds = session.ctx, session.run, session.config, record["seconds"]
    if session.kept is not None:
        t = time.perf_counter()
        gathered = gather_object(ctx, session.kept)
        merged = {key: value for part in gathered for key, value in part.items()} if ctx.is_main else {}
        state = session.state
        record["next_scores"] = scores_from_training(
            merged, run.scores(epoch), run.scores(epoch + 1), state.model, state.tokenizer, state.image_size,
            session.source, dtype=config.score_dtype, batch_size=config.score_batch_size,
            num_workers=config.warmup.num_workers, ctx=ctx, device=state.device, checkpoint=str(run.checkpoint(epoch)))
        seconds["score"] = seconds.get("score", 0.0) + round(time.perf_counter() - t, 3)
        session.kept = None
    k = epoch - session.defense.warm_epochs
    if config.eval_every and ((k + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
        t = time.perf_counter()
        state = session.state
        result = (zero_shot_top1(state.model, state.tokenizer, state.image_size, config.eval_test,
                                 config.eval_classes, state.device, config.score_batch_size) if ctx.is_main else None)
        record.update(broadcast_object(ctx, result))
        seconds["eval"] = round(time.perf_counter() - t, 3)
    seconds["total"] = round(sum(seconds.values()), 3)
    if ctx.is_main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        session.state.save(run.checkpoint(epoch), Progress(
            "pretrain", config.to_dict(), {"epoch": epoch, "global_step": record["global_step"]}, str(session.src),
            session.shape, safe_ratio=record.get("safe_ratio")))
        session.records = [r for r in session.records if not (r.get("stage") == "pretrain" and r["epoch"] >= epoch)]
        session.records.append(record)
        run.write_metrics(session.records)
        for old in run.saved_epochs()[:-config.keep]:
            run.checkpoint(old).unlink(missing_ok=True)
    session.last_checkpoint = str(run.checkpoint(epoch))
    barrier(ctx)
    if session.hooks.epoch_end:
        session.hooks.epoch_end(record)


def finish_run(session: Session, seconds: float) -> PretrainResult:
    run, config = session.run, session.config
    finished = bool(run.saved_epochs()) and run.saved_epochs()[-1] == config.epochs - 1
    if session.ctx.is_main:
        run.write_stats({
            "stage": "pretrain", "source": str(session.src), "run": str(run.root), "finished": finished,
            "defense": config.defense, "config": config.to_dict(), "model": session.state.model_config.get("name"),
            "pairs_per_epoch": session.shape["pairs"], "world_size": session.ctx.world_size,
            "device": str(session.state.device), "last_checkpoint": session.last_checkpoint,
            "seconds_this_invocation": round(seconds, 3), "epochs": session.records,
        })
    return PretrainResult(str(run.root), session.records, finished, session.last_checkpoint)
