"""The full SafeCLIP loop: warm-up, then score → split → train, every epoch.

Phases 1–2 are `safeclip warmup` itself (`run_warmup`, writing RUN/warmup.pt), so
the warm-up has one implementation, one checkpoint format and one resume logic.
Phase 3, for each later epoch K:
  1. score every pair: a no-grad pass with the eval transform written in embed's
     Parquet schema to RUN/scores/epoch=K/ (`embed_source`), or, with
     `score_from_training`, the view-1 embeddings the previous epoch's training
     pass already computed (no extra forward pass);
  2. split with the ratio schedule (`split.split`, the code of `safeclip split`)
     into RUN/splits/epoch=K/{safe,risky}/;
  3. train one pass: the safe set with the cross-augmented CLIP loss and the risky
     set with the unimodal nearest-neighbour loss.

CLIP views (`clip_views`): "cross" is SafeCLIP's cross-augmented CLIP loss on two
SimCLR/EDA views; "plain" is CLIP's own loss on the eval-transformed image and the
caption as written (one forward per pair, half the work). "auto" takes cross for
the safeclip defense (the paper) and plain for the baselines, which the paper
compares against as plain CLIP, and whose attacks must be allowed to work: random
crops cut a corner trigger out of about a quarter of the views.

How the two losses share an epoch (following the official code: one epoch visits
the safe set with the CLIP loss and the risky set with the unimodal loss): the
safe and risky partitions are two streams of full-size batches, interleaved in
proportion to their sizes (a safe batch whenever the safe stream is behind the
risky one in its share of the epoch). Each optimizer step is one loss on one
batch, so the CLIP loss keeps its full batch of negatives even when the safe set
is small, and every pair is seen exactly once per epoch.

Baselines: `defense="none"` trains the CLIP loss on every pair for every epoch
(no warm-up phases, never splits); `defense="clip-score"` warms up, splits once
with a fixed fraction/threshold and trains the CLIP loss on that safe set only
(DataComp-style filtering).

Checkpoints: RUN/checkpoints/epoch_KKKK.pt after every phase-3 epoch (atomic,
the newest `keep` kept). Resume restarts the interrupted epoch from the newest
checkpoint; data order and augmentations are functions of (seed, epoch, shard,
position), so a resumed run ends in the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..train.augment import EDA, eval_transform
from ..models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..train.distributed import Dist, barrier, broadcast_object, gather_features, gather_object
from .embed import embed_source, output_name, write_manifest
from ..train.losses import MemoryBank, unimodal_loss
from ..train.optim import lr_at, make_optimizer
from ..io.pairs import PairSource, Shard, Skips, open_pairs
from ..io.shards import atomic_write_bytes, atomic_write_json
from ..train.batches import PairBatches, make_loader
from .warmup import EpochStats, Precision, WarmupConfig, run_epoch, run_warmup

DEFENSES = ("safeclip", "none", "clip-score")

# Presets fill in options the user did not give. "paper": the official SafeCLIP
# defaults. "cpu": the shipped tiny ViT sized so a run over 60k Fashion-MNIST pairs
# fits a short CPU budget (see docs/performance.md); a larger CLIP warm-up factor
# because one CLIP epoch of 118 steps at 0.01 x lr barely aligns the towers.
PRESETS: dict[str, dict] = {
    "paper": dict(model="RN50", batch_size=128, lr=5e-4, weight_decay=0.1, warmup_steps=10_000, epochs=32,
                  unimodal_epochs=5, clip_epochs=1, clip_lr_scale=0.01, ratio_schedule="safeclip:step=0.01,cap=0.85",
                  memory_bank=4096),
    "cpu": dict(model="safeclip-tiny-vit", batch_size=512, lr=1e-3, weight_decay=0.1, warmup_steps=10, epochs=3,
                unimodal_epochs=1, clip_epochs=1, clip_lr_scale=0.1, ratio_schedule="safeclip:step=0.01,cap=0.85",
                memory_bank=4096),
}


@dataclass
class PretrainConfig:
    """Phase 1–2 settings live in `warmup` (a WarmupConfig, shared with `safeclip warmup`);
    the rest is phase 3. Saved in every checkpoint so a resume replays it."""

    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    epochs: int = 32
    defense: str = "safeclip"
    ratio_schedule: str = "safeclip"
    ranking: str = "global"
    clip_views: str = "auto"
    score_from_training: bool = False
    fit_sample: int = 1_000_000
    score_batch_size: int = 256
    score_dtype: str = "float16"
    local_loss: bool = False
    keep: int = 2
    eval_every: int = 0
    eval_test: str | None = None
    eval_classes: str = "fashion-mnist"

    def to_dict(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "warmup"}
        data["warmup"] = self.warmup.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"warmup"}
        return cls(warmup=WarmupConfig.from_dict(data.get("warmup", {})),
                   **{k: v for k, v in data.items() if k in known})

    @property
    def clip_view_mode(self) -> str:
        """"plain" or "cross": what the CLIP loss of phase 3 trains on (see the module doc)."""
        if self.clip_views != "auto":
            return self.clip_views
        return "cross" if self.defense == "safeclip" else "plain"

    @property
    def warm_epochs(self) -> int:
        """Epochs spent in phases 1–2 (none for the plain-CLIP baseline)."""
        return 0 if self.defense == "none" else self.warmup.unimodal_epochs + self.warmup.clip_epochs

    def validate(self) -> None:
        from ..models.factory import resolve_config
        from ..defenses.schedule import parse_schedule

        if self.defense not in DEFENSES:
            raise ValueError(f"unknown defense {self.defense!r}; choose one of {', '.join(DEFENSES)}")
        if self.defense != "none":
            self.warmup.validate()
            if self.warm_epochs >= self.epochs:
                raise ValueError(f"--unimodal-epochs + --clip-epochs ({self.warm_epochs}) must be fewer than "
                                 f"--epochs ({self.epochs}): no epoch would be left to train on the split")
        elif self.epochs < 1:
            raise ValueError("--epochs must be >= 1")
        if self.warmup.batch_size < 2:
            raise ValueError("batch size must be >= 2 for contrastive losses")
        schedule = parse_schedule(self.ratio_schedule)
        if self.defense == "clip-score" and schedule.kind == "safeclip":
            raise ValueError("--defense clip-score needs a fixed cut: --ratio-schedule fraction:F or threshold:T")
        if self.ranking not in ("global", "balanced"):
            raise ValueError(f"unknown ranking {self.ranking!r}; choose global or balanced")
        if self.clip_views not in ("auto", "plain", "cross"):
            raise ValueError(f"unknown --clip-views {self.clip_views!r}; choose auto, plain or cross")
        if self.keep < 1:
            raise ValueError("--keep must be >= 1")
        if self.eval_every < 0:
            raise ValueError("--eval-every must be >= 0")
        if self.eval_every and not self.eval_test:
            raise ValueError("--eval-every needs --eval-test (a pair source with class labels)")
        if self.score_from_training and self.defense != "safeclip":
            raise ValueError("--score-from-training only applies to --defense safeclip")
        resolve_config(self.warmup.model)  # unknown model: a clear error before any work


def apply_preset(name: str | None, given: dict) -> dict:
    """The preset's values for every option not in `given`, then `given` (explicit wins)."""
    if name is None:
        return dict(given)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **given}


# ---- run layout ----------------------------------------------------------------------

class Layout:
    """Where everything of one run lives."""

    def __init__(self, run: str | os.PathLike):
        self.root = Path(run)
        self.warmup = self.root / "warmup.pt"
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics.jsonl"
        self.stats = self.root / "pretrain_stats.json"
        self.config = self.root / "config.json"

    def scores(self, epoch: int) -> Path:
        return self.root / "scores" / f"epoch={epoch}"

    def split(self, epoch: int) -> Path:
        return self.root / "splits" / f"epoch={epoch}"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def saved_epochs(self) -> list[int]:
        found = []
        for path in self.checkpoints.glob("epoch_*.pt"):
            match = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)


# ---- partitions as pair sources ------------------------------------------------------

def _read_only(keys: frozenset, inner: Callable, shard: Shard, skips: Skips) -> Iterator:
    """A shard reader that yields only the pairs whose key is in `keys` (module level: pickles)."""
    for pair in inner(shard, skips):
        if pair.key in keys:
            yield pair


def subset_source(source: PairSource, keys_by_shard: dict[str, list[str]]) -> PairSource:
    """The pairs of `source` whose keys are listed for their shard (by embed's output name).
    Shard order and positions are kept, so data order stays a function of the seed."""
    shards = []
    for shard in source.shards:
        keys = frozenset(keys_by_shard.get(Path(output_name(shard)).stem, ()))
        shards.append(Shard(shard.name, shard.path, functools.partial(_read_only, keys, shard.read), len(keys)))
    return PairSource(source.format, source.root, shards)


def partition_keys(part_dir: Path, partition: str) -> dict[str, list[str]]:
    """{shard stem: keys} of one partition of a split."""
    import pyarrow.parquet as pq

    out = {}
    for path in sorted((part_dir / partition).glob("*.parquet")):
        if not path.name.startswith("."):
            out[path.stem] = pq.read_table(path, columns=["key"]).column("key").to_pylist()
    return out


# ---- scoring ---------------------------------------------------------------------------

def _share_files(ctx: Dist, folder: Path, names: list[str]) -> None:
    """Give rank 0 every rank's score files (a no-op on a shared filesystem, where they
    are already there; needed when each node writes RUN to its own disk)."""
    if not ctx.enabled:
        return
    mine = {}
    for name in names:
        path = folder / name
        if path.exists():
            mine[name] = path.read_bytes()
    received = gather_object(ctx, {n: b for n, b in mine.items()} if ctx.rank else {})
    if ctx.is_main and received:
        for files in received:
            for name, data in files.items():
                if not (folder / name).exists():
                    atomic_write_bytes(folder / name, data)


def score_pass(source: PairSource, model: torch.nn.Module, tokenizer, image_size: int, out: Path,
               config: PretrainConfig, ctx: Dist, device: torch.device, checkpoint: str,
               on_batch: Callable[[int], None] | None = None) -> float:
    """The separate no-grad scoring pass (embed's code), each rank its shards; returns seconds."""
    started = time.perf_counter()
    was_training = model.training
    embed_source(source, model, tokenizer, eval_transform(image_size), out, batch_size=config.score_batch_size,
                 dtype=config.score_dtype, num_workers=config.warmup.num_workers, device=str(device),
                 rank=ctx.rank, world_size=ctx.world_size, on_batch=on_batch)
    model.train(was_training)
    _share_files(ctx, out, [output_name(s) for i, s in enumerate(source.shards) if i % ctx.world_size == ctx.rank])
    barrier(ctx)
    if ctx.is_main:
        write_manifest(out, checkpoint=checkpoint, source=source, dtype=config.score_dtype, augment=False,
                       seconds=time.perf_counter() - started, world_size=ctx.world_size,
                       extra={"scored_by": "separate pass"})
    return time.perf_counter() - started


def scores_from_training(kept: dict[str, tuple[np.ndarray, np.ndarray]], previous: Path, out: Path,
                         dtype: str, checkpoint: str, source: PairSource, world_size: int) -> int:
    """Write the next epoch's score files from embeddings the training pass kept.

    Rows (key, caption, metadata) come from the previous scores; image_emb, text_emb
    and similarity are replaced for every kept key. A pair the training pass did not
    see (dropped from a rank's last partial batch under torchrun) keeps its previous
    score. Returns the number of pairs rescored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    np_dtype, arrow_type = (np.float16, pa.float16()) if dtype == "float16" else (np.float32, pa.float32())
    rescored = 0
    for path in sorted(previous.glob("*.parquet")):
        if path.name.startswith("."):
            continue
        table = pq.read_table(path)
        keys = table.column("key").to_pylist()
        dim = table.schema.field("image_emb").type.list_size
        image = np.asarray(table.column("image_emb").combine_chunks().flatten(), np.float32).reshape(-1, dim)
        text = np.asarray(table.column("text_emb").combine_chunks().flatten(), np.float32).reshape(-1, dim)
        for row, key in enumerate(keys):
            hit = kept.get(key)
            if hit is not None:
                image[row], text[row] = hit
                rescored += 1
        similarity = np.einsum("nd,nd->n", image, text).astype(np.float32)

        def vectors(matrix: np.ndarray):
            flat = pa.array(np.ascontiguousarray(matrix, dtype=np_dtype).reshape(-1), type=arrow_type)
            return pa.FixedSizeListArray.from_arrays(flat, dim)

        for name, column in (("image_emb", vectors(image)), ("text_emb", vectors(text)),
                             ("similarity", pa.array(similarity, pa.float32()))):
            table = table.set_column(table.schema.get_field_index(name), name, column)
        import io
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        atomic_write_bytes(out / path.name, buffer.getvalue())
    write_manifest(out, checkpoint=checkpoint, source=source, dtype=dtype, augment=True, seconds=0.0,
                   world_size=world_size, extra={"scored_by": "training pass (view 1, weights of the step)",
                                                 "rescored": rescored})
    return rescored


# ---- one training step of phase 3 ------------------------------------------------------

def _ddp_clip_loss(image_a: torch.Tensor, text_b: torch.Tensor, scale: torch.Tensor, ctx: Dist,
                   local_loss: bool) -> torch.Tensor:
    """CLIP loss with features gathered across ranks, as open_clip's ClipLoss:
    global logits, or with `local_loss` this rank's rows against all columns."""
    import torch.nn.functional as F

    (all_image, offset), (all_text, _) = gather_features(image_a, ctx), gather_features(text_b, ctx)
    if local_loss and ctx.enabled:
        logits_image = scale * image_a @ all_text.t()
        logits_text = scale * text_b @ all_image.t()
        labels = torch.arange(len(image_a), device=image_a.device) + offset
    else:
        logits_image = scale * all_image @ all_text.t()
        logits_text = logits_image.t()
        labels = torch.arange(len(all_image), device=image_a.device)
    return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


class Phase3Step:
    """The loss of one phase-3 batch. The forward goes through `net` (the DDP wrapper
    under torchrun, so gradients are all-reduced); `keep` collects view-1 embeddings
    for --score-from-training."""

    def __init__(self, net: torch.nn.Module, device: torch.device, ctx: Dist, temperature: float,
                 banks: dict[str, MemoryBank] | None, local_loss: bool, keep: dict | None):
        self.net, self.device, self.ctx = net, device, ctx
        self.temperature, self.banks, self.local_loss, self.keep = temperature, banks, local_loss, keep

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        from ..train.losses import MAX_LOGIT_SCALE

        n = len(batch["key"])
        plain = "image" in batch  # plain CLIP: the pair as it is, one forward; else two views
        images = batch["image"] if plain else torch.cat([batch["image1"], batch["image2"]])
        texts = batch["text"] if plain else torch.cat([batch["text1"], batch["text2"]])
        out = self.net(images.to(self.device, non_blocking=True), texts.to(self.device, non_blocking=True))
        # open_clip: normalised image, text features, exp(logit_scale)
        image, text, scale = out[0].float(), out[1].float(), out[2].float().clamp(max=MAX_LOGIT_SCALE)
        if self.keep is not None:
            image1, text1 = image[:n].detach().cpu().numpy(), text[:n].detach().cpu().numpy()
            for i, key in enumerate(batch["key"]):
                self.keep[key] = (image1[i], text1[i])
        if plain:
            loss = _ddp_clip_loss(image, text, scale, self.ctx, self.local_loss)
            return loss, {"loss_clip": loss.item()}
        if batch["loss"] == "clip":
            loss = 0.5 * (_ddp_clip_loss(image[:n], text[n:], scale, self.ctx, self.local_loss)
                          + _ddp_clip_loss(image[n:], text[:n], scale, self.ctx, self.local_loss))
            return loss, {"loss_clip": loss.item()}
        banks = self.banks or {}
        loss_image = unimodal_loss(image[:n], image[n:], self.temperature, banks.get("image"))
        loss_text = unimodal_loss(text[:n], text[n:], self.temperature, banks.get("text"))
        # The logit scale takes no part here; a zero term keeps DDP's "every parameter
        # got a gradient" bookkeeping true without find_unused_parameters.
        loss = loss_image + loss_text + 0.0 * scale
        return loss, {"loss_image": loss_image.item(), "loss_text": loss_text.item()}


# ---- the two streams of one epoch ------------------------------------------------------

def interleave_plan(n_safe: int, n_risky: int) -> list[str]:
    """Which stream each step draws from: safe ("clip") batches spread evenly among
    risky ("unimodal") ones, in proportion to their counts. Deterministic."""
    plan, s, r = [], 0, 0
    while s < n_safe or r < n_risky:
        if r >= n_risky or (s < n_safe and s * n_risky <= r * n_safe):
            plan.append("clip")
            s += 1
        else:
            plan.append("unimodal")
            r += 1
    return plan


def _real_batches(batches: Iterable[dict], limit: int, tag: str) -> Iterator[dict]:
    """Up to `limit` non-empty batches, tagged with their loss; skip counts ride along."""
    pending: dict = {}
    given = 0
    for batch in batches:
        for reason, count in batch.get("skips", {}).items():
            pending[reason] = pending.get(reason, 0) + count
        if not batch["key"]:
            continue
        if given >= limit:
            break
        batch["skips"], pending = pending, {}
        batch["loss"] = tag
        given += 1
        yield batch


def interleave(streams: dict[str, Iterator[dict]], plan: list[str]) -> Iterator[dict]:
    for tag in plan:
        batch = next(streams[tag], None)
        if batch is not None:
            yield batch


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


# ---- evaluation -----------------------------------------------------------------------

def zero_shot_accuracy(model: torch.nn.Module, tokenizer, image_size: int, test: str, classes: str,
                       device: torch.device, batch_size: int = 256) -> dict:
    """Top-1 zero-shot accuracy on a labelled pair source (sanitize.evaluate's functions)."""
    from ..evaluation.evaluate import image_features, predict, text_embeddings, zero_shot_scores, zero_shot_weights
    from ..evaluation.templates import load_classes, load_templates

    class_set = load_classes(classes)
    was_training = model.training
    model.eval()
    weights = zero_shot_weights(text_embeddings(model, tokenizer, list(class_set.prompt_names), load_templates(),
                                                device=str(device)))
    feats = image_features(open_pairs(test), model, eval_transform(image_size), list(class_set.names),
                           batch_size=batch_size, device=str(device))
    model.train(was_training)
    known = feats.labels >= 0
    if not known.any():
        raise ValueError(f"{test}: no pair has a label among --eval-classes")
    pred = predict(zero_shot_scores(feats.image[known], weights))
    return {"zero_shot_top1": float(np.mean(pred == feats.labels[known])), "eval_pairs": int(known.sum())}


# ---- the loop -----------------------------------------------------------------------------

@dataclass
class PretrainResult:
    run: str
    epochs: list[dict]
    finished: bool
    last_checkpoint: str | None


@dataclass
class Hooks:
    """Progress callbacks (the CLI's bars); all optional."""

    warmup_epoch_start: Callable | None = None
    step: Callable | None = None
    epoch_start: Callable[[str, int, int], None] | None = None
    score_batch: Callable[[int], None] | None = None
    stage: Callable[[str, int], None] | None = None
    epoch_end: Callable[[dict], None] | None = None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def _device(device: str, ctx: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and ctx.enabled:
        device = f"cuda:{ctx.local_rank}"
    return torch.device(device)


def adopt_warmup(warmup: str | os.PathLike, layout: Layout, config: PretrainConfig) -> None:
    """Copy a finished warm-up (`safeclip warmup`, or another run's RUN/warmup.pt) into
    this run, so ablations on the same data share phases 1–2 instead of repeating them.
    Its settings must equal this run's warm-up settings (workers aside): the run then
    ends exactly as if it had trained the warm-up itself."""
    from .warmup import side_paths

    state = read_checkpoint(warmup)["training_state"]
    if state.get("stage") != "warmup":
        raise CheckpointError(f"{warmup}: not a warm-up checkpoint (stage {state.get('stage')!r})")
    if not state.get("warmup_state", {}).get("finished"):
        raise CheckpointError(f"{warmup}: the warm-up did not finish; resume it first")
    theirs, ours = dict(state.get("warmup_config", {})), config.warmup.to_dict()
    differ = sorted(k for k in set(theirs) | set(ours) if k != "num_workers" and theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"{warmup}: trained with other warm-up settings ("
                         + ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in differ) + ")")
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(layout.warmup, Path(warmup).read_bytes())
    for theirs_side, ours_side in zip(side_paths(warmup), side_paths(layout.warmup)):
        if theirs_side.exists():
            atomic_write_bytes(ours_side, theirs_side.read_bytes())


def run_pretrain(src: str, run: str | os.PathLike, config: PretrainConfig, *, resume: bool = False,
                 ctx: Dist | None = None, device: str = "auto", source_format: str | None = None,
                 threads: int | None = None, hooks: Hooks | None = None, warmup_from: str | None = None,
                 stop_after_epoch: int | None = None, max_steps_per_epoch: int | None = None) -> PretrainResult:
    """Train from pairs at `src` into the run folder `run` (see the module doc).
    `warmup_from` takes phases 1–2 from a finished warm-up checkpoint (`adopt_warmup`).
    `stop_after_epoch` ends the run after that overall epoch and `max_steps_per_epoch`
    cuts each phase-3 epoch short (benchmarks: time a fraction of an epoch)."""
    from .split import split

    ctx = ctx or Dist()
    hooks = hooks or Hooks()
    layout = Layout(run)
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device, ctx)

    saved = None
    if resume:
        epochs_saved = layout.saved_epochs()
        if epochs_saved:
            payload = read_checkpoint(layout.checkpoint(epochs_saved[-1]))
            saved = payload["training_state"]
            if saved.get("stage") != "pretrain":
                raise CheckpointError(f"{layout.checkpoint(epochs_saved[-1])}: not a pretrain checkpoint")
            config = PretrainConfig.from_dict(saved["pretrain_config"])
        elif layout.config.exists():
            config = PretrainConfig.from_dict(json.loads(layout.config.read_text()))
        else:
            raise CheckpointError(f"{run}: nothing to resume (no pretrain run there yet)")
    config.validate()
    wcfg = config.warmup
    source = open_pairs(src, format=source_format)  # a bad source fails before RUN is touched
    if warmup_from and config.defense == "none":
        raise ValueError("--warmup-from does not apply to --defense none (it has no warm-up)")
    if warmup_from and saved is None and not layout.warmup.exists():
        if ctx.is_main:
            adopt_warmup(warmup_from, layout, config)
        barrier(ctx)
    if ctx.is_main:
        layout.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(layout.config, config.to_dict())
    barrier(ctx)

    records = [r for r in _read_jsonl(layout.metrics)] if resume else []
    started_at = time.perf_counter()

    # ---- phases 1–2: `safeclip warmup`'s own code, on rank 0 -------------------------
    if config.defense != "none" and saved is None:
        done_before = False
        if layout.warmup.exists():
            state = read_checkpoint(layout.warmup)["training_state"]
            done_before = bool(state.get("warmup_state", {}).get("finished"))
            if not resume and not done_before:
                raise FileExistsError(f"{layout.warmup}: an unfinished warm-up is there; pass --resume")
        if not done_before:
            if ctx.is_main:
                # Under torchrun the other ranks wait: the warm-up is single-process code.
                result = run_warmup(src, layout.warmup, wcfg, resume=layout.warmup.exists(), device=str(dev),
                                    source_format=source_format, threads=threads,
                                    on_epoch_start=hooks.warmup_epoch_start, on_step=hooks.step,
                                    max_steps=None)
                records = [dict(r, stage="warmup") for r in result.epochs]
                _write_jsonl(layout.metrics, records)
            barrier(ctx)
        else:
            from .warmup import side_paths

            records = [dict(r, stage="warmup") for r in _read_jsonl(side_paths(layout.warmup)[0])]
            if ctx.is_main:
                _write_jsonl(layout.metrics, records)
        records = broadcast_object(ctx, records)

    # ---- model, optimizer, memory banks ---------------------------------------------
    if saved is not None:
        model, tokenizer, image_size, model_cfg, _ = load_checkpoint(layout.checkpoint(layout.saved_epochs()[-1]))
        state_from = saved
    elif config.defense != "none":
        model, tokenizer, image_size, model_cfg, state_from = load_checkpoint(layout.warmup)
    else:
        from ..models.factory import create_model

        torch.manual_seed(wcfg.seed)
        model, tokenizer, image_size, model_cfg = create_model(wcfg.model, wcfg.pretrained)
        state_from = None
    model.to(dev)
    precision = Precision.choose(wcfg.precision, dev)
    optimizer = make_optimizer(model, wcfg.lr, wcfg.weight_decay)
    embed_dim = int(model_cfg["embed_dim"])
    banks = ({m: MemoryBank(wcfg.memory_bank, embed_dim).to(dev) for m in ("image", "text")}
             if wcfg.memory_bank and config.defense == "safeclip" else None)
    if state_from is not None:
        optimizer.load_state_dict(state_from["optimizer"])
        if banks and state_from.get("banks"):
            for m, bank in banks.items():
                bank.load_state_dict(state_from["banks"][m])
        set_rng_state(state_from["rng"])
    net = model
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    plain_clip = config.clip_view_mode == "plain"
    full = PairBatches(source, tokenizer, image_size, wcfg.batch_size, seed=wcfg.seed,
                       views=not plain_clip, plain=plain_clip,
                       shuffle_buffer=wcfg.shuffle_buffer, eda=EDA(alpha=wcfg.eda_alpha),
                       crop_scale=wcfg.crop_scale, rank=ctx.rank, world_size=ctx.world_size)
    n_pairs = full.pairs_per_epoch() if ctx.world_size == 1 else sum(full.shard_counts())
    if n_pairs < 2:
        raise ValueError(f"{src}: need at least 2 pairs to train, found {n_pairs}")
    shape = {"shards": len(source.shards), "pairs": sum(full.shard_counts())}
    if state_from is not None and state_from.get("source_shape", shape) != shape:
        raise ValueError(f"{src}: not the data this run was trained on ({state_from.get('source_shape')} vs {shape})")

    first_epoch = config.warm_epochs if saved is None else int(saved["epoch"]) + 1
    phase_epochs = config.epochs - config.warm_epochs
    # Phase 3's LR schedule is fixed before any split: per epoch, the steps of the
    # largest per-rank share of shards, plus one for the second stream's partial batch.
    counts_desc = sorted(full.shard_counts(), reverse=True)
    largest_share = sum(counts_desc[:math.ceil(len(counts_desc) / ctx.world_size)])
    steps_per_epoch = math.ceil(largest_share / wcfg.batch_size) + 1
    total_steps = max(1, phase_epochs * steps_per_epoch)
    warm_steps = wcfg.warmup_steps if wcfg.warmup_steps is not None else total_steps // 10

    def lr_for_step(step: int) -> float:
        return lr_at(step, total_steps, wcfg.lr, warm_steps, wcfg.min_lr)

    kept: dict | None = None
    last_ckpt = str(layout.checkpoint(layout.saved_epochs()[-1])) if saved is not None else (
        str(layout.warmup) if config.defense != "none" else None)
    for epoch in range(first_epoch, config.epochs):
        if stop_after_epoch is not None and epoch > stop_after_epoch:
            break
        k = epoch - config.warm_epochs  # index inside phase 3 = the schedule's epoch
        seconds: dict[str, float] = {}
        record: dict = {"epoch": epoch, "stage": "pretrain", "phase": config.defense, "phase_epoch": k,
                        "clip_views": config.clip_view_mode}

        # 1-2. score and split (rank 0 splits; everyone reads the same partition)
        keys_safe = keys_risky = None
        if config.defense != "none":
            split_epoch = epoch if config.defense == "safeclip" else config.warm_epochs
            if epoch == split_epoch:
                scores_dir = layout.scores(epoch)
                from_training = (config.score_from_training and k > 0
                                 and (scores_dir / "embed.json").exists())
                if not from_training:
                    if hooks.stage:
                        hooks.stage(f"epoch {epoch + 1} scoring", n_pairs // ctx.world_size)
                    seconds["score"] = round(score_pass(source, model, tokenizer, image_size, scores_dir, config,
                                                        ctx, dev, last_ckpt or "", hooks.score_batch), 3)
                record["scored_by"] = "training pass" if from_training else "separate pass"
                t = time.perf_counter()
                manifest = None
                if ctx.is_main:
                    previous = layout.split(config.warm_epochs) if k > 0 else None
                    result = split(scores_dir, layout.split(epoch), config.ratio_schedule, epoch=k,
                                   fit_sample=config.fit_sample, seed=wcfg.seed, previous=previous,
                                   ranking=config.ranking, force=True)
                    manifest = result.manifest
                manifest = broadcast_object(ctx, manifest)
                seconds["split"] = round(time.perf_counter() - t, 3)
                record.update({"safe_ratio": manifest["counts"]["safe_share"], "ratio": manifest["ratio"],
                               "n_safe": manifest["counts"]["safe"], "n_risky": manifest["counts"]["risky"],
                               "mixture": manifest["mixture"], "split": str(layout.split(epoch))})
                if manifest.get("warnings"):
                    record["split_warnings"] = manifest["warnings"]
            else:  # clip-score: the one split after the warm-up, again
                record.update({"split": str(layout.split(split_epoch)),
                               "safe_ratio": broadcast_object(ctx, json.loads(
                                   (layout.split(split_epoch) / "split.json").read_text())["counts"]["safe_share"]
                                   if ctx.is_main else None)})
            part = layout.split(split_epoch)
            keys = broadcast_object(ctx, (partition_keys(part, "safe"), partition_keys(part, "risky"))
                                    if ctx.is_main else None)
            keys_safe, keys_risky = keys
            if config.defense == "clip-score":
                keys_risky = {}  # the filtered-out pairs are not trained on at all

        # 3. one training pass
        streams_data: dict[str, PairBatches] = {}
        if config.defense == "none":
            streams_data["clip"] = full
        else:
            for tag, keys_by_shard in (("clip", keys_safe), ("unimodal", keys_risky)):
                if sum(len(v) for v in keys_by_shard.values()):
                    plain = plain_clip and tag == "clip"
                    streams_data[tag] = PairBatches(
                        subset_source(source, keys_by_shard), tokenizer, image_size, wcfg.batch_size,
                        seed=wcfg.seed, views=not plain, plain=plain, shuffle_buffer=wcfg.shuffle_buffer,
                        eda=EDA(alpha=wcfg.eda_alpha), crop_scale=wcfg.crop_scale, rank=ctx.rank,
                        world_size=ctx.world_size)
        counts = {}
        for tag, data in streams_data.items():
            data.set_epoch(epoch)
            counts[tag] = _batches_for(data, epoch, wcfg.num_workers, ctx)
        plan = interleave_plan(counts.get("clip", 0), counts.get("unimodal", 0))
        streams = {tag: _real_batches(make_loader(data, wcfg.num_workers), counts[tag], tag)
                   for tag, data in streams_data.items()}
        if hooks.epoch_start:
            hooks.epoch_start(config.defense, epoch, len(plan))
        keep_now = config.score_from_training and config.defense == "safeclip" and epoch + 1 < config.epochs
        kept = {} if keep_now else None
        loss_fn = Phase3Step(net, dev, ctx, wcfg.temperature, banks, config.local_loss, kept)
        stats = EpochStats()
        first_step = k * steps_per_epoch
        taken = run_epoch(model, interleave(streams, plan), optimizer, loss_fn, lr_for_step, first_step, stats,
                          precision=precision, grad_clip=wcfg.grad_clip, max_batches=max_steps_per_epoch,
                          on_step=hooks.step)
        seconds["train"] = round(stats.seconds, 3)
        all_pairs = gather_object(ctx, stats.pairs)  # each rank trained on its own share
        pairs_total = sum(all_pairs) if all_pairs else stats.pairs
        record.update({"steps": taken, "pairs": pairs_total, "lr_last": stats.lr,
                       "pairs_per_s": round(pairs_total / stats.seconds, 2) if stats.seconds else None,
                       "logit_scale": float(model.logit_scale.detach().exp()), "skipped": stats.skips,
                       "planned_steps": len(plan),
                       "steps_clip": plan[:taken].count("clip"), "steps_unimodal": plan[:taken].count("unimodal"),
                       **stats.means()})

        # score-from-training: the next epoch's scores, from this pass's embeddings
        if kept is not None:
            t = time.perf_counter()
            gathered = gather_object(ctx, kept)
            if ctx.is_main:
                merged = {}
                for part_kept in gathered:
                    merged.update(part_kept)
                score_epoch = layout.scores(epoch)
                # the scores this epoch's split used (the first post-warm-up epoch's or the previous kept ones)
                scores_from_training(merged, score_epoch, layout.scores(epoch + 1), config.score_dtype,
                                     str(layout.checkpoint(epoch)), source, ctx.world_size)
            barrier(ctx)
            seconds["score"] = seconds.get("score", 0.0) + round(time.perf_counter() - t, 3)
            kept = None

        # evaluation
        last_epoch = epoch + 1 == config.epochs
        if config.eval_every and ((k + 1) % config.eval_every == 0 or last_epoch):
            t = time.perf_counter()
            result_eval = (zero_shot_accuracy(model, tokenizer, image_size, config.eval_test, config.eval_classes,
                                              dev, config.score_batch_size) if ctx.is_main else None)
            record.update(broadcast_object(ctx, result_eval))
            seconds["eval"] = round(time.perf_counter() - t, 3)

        # checkpoint + metrics (rank 0), then prune
        seconds["total"] = round(sum(seconds.values()), 3)
        record["seconds"] = seconds
        if ctx.is_main:
            layout.checkpoints.mkdir(parents=True, exist_ok=True)
            save_checkpoint(layout.checkpoint(epoch), model, model_cfg, training_state={
                "stage": "pretrain", "epoch": epoch, "pretrain_config": config.to_dict(),
                "optimizer": optimizer.state_dict(),
                "banks": {m: b.state_dict() for m, b in banks.items()} if banks else {},
                "rng": rng_state(), "safe_ratio": record.get("safe_ratio"), "source": str(src),
                "source_shape": shape, "global_step": first_step + taken,
            })
            records = [r for r in records if not (r.get("stage") == "pretrain" and r["epoch"] >= epoch)]
            records.append(record)
            _write_jsonl(layout.metrics, records)
            for old in layout.saved_epochs()[:-config.keep]:
                layout.checkpoint(old).unlink(missing_ok=True)
        last_ckpt = str(layout.checkpoint(epoch))
        barrier(ctx)
        if hooks.epoch_end:
            hooks.epoch_end(record)

    finished = bool(layout.saved_epochs()) and layout.saved_epochs()[-1] == config.epochs - 1
    if ctx.is_main:
        atomic_write_json(layout.stats, {
            "stage": "pretrain", "source": str(src), "run": str(layout.root), "finished": finished,
            "defense": config.defense, "config": config.to_dict(), "model": model_cfg.get("name"),
            "pairs_per_epoch": n_pairs, "world_size": ctx.world_size, "device": str(dev),
            "last_checkpoint": last_ckpt, "seconds_this_invocation": round(time.perf_counter() - started_at, 3),
            "epochs": records,
        })
    return PretrainResult(str(layout.root), records, finished, last_ckpt)
