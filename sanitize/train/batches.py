"""Batches of training views read shard by shard from any pair source.

`PairBatches` is a torch IterableDataset: each DataLoader worker (and, later,
each distributed rank) reads its own subset of shards, decodes and augments in
the worker, and yields ready batches. Everything random is a function of
(seed, epoch, shard, position): the shard order, the shuffle buffer and every
augmentation. So a run is reproducible for a fixed number of workers, and a
resumed run sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import EDA, eval_transform
from .views import BatchViews, base_image, draw_view_params
from ..io.pairs import PairSource, Skips
from ..io.loader_workers import exit_with_parent, worker_context


def sample_seed(seed: int, epoch: int, shard: int, position: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentations."""
    return int(np.random.SeedSequence([seed, epoch, shard, position]).generate_state(2, np.uint64)[0] >> 1)


class PairBatches(IterableDataset):
    """Yields dict batches: `key` (list of str) and, with `views`, two EDA views' tokens
    `text1`/`text2` and the image views — either made here (`views_here`: `image1`/`image2`)
    or left to the trainer's device (`image_u8`, the decoded squares, and `view_params`,
    each image's drawn view parameters; see train/views.py); with `plain`, the
    eval-transformed `image` and the caption's tokens `text`. Also `skips`: per-reason
    counts of pairs skipped since the previous batch."""

    def __init__(self, source: PairSource, tokenizer: Callable[..., torch.Tensor], image_size: int,
                 batch_size: int, *, seed: int = 0, views: bool = True, plain: bool = False,
                 shuffle: bool = True, shuffle_buffer: int = 2000, eda: EDA | None = None,
                 crop_scale: tuple[float, float] = (0.5, 1.0), rank: int = 0, world_size: int = 1,
                 shard_counts: list[int] | None = None, views_here: bool = False):
        if batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if not (views or plain):
            raise ValueError("PairBatches needs views, plain, or both")
        self.source = source
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.views = views
        self.plain = plain
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        # Both kinds of transform always exist so a trainer can switch `views` /
        # `plain` between epochs (e.g. unimodal warm-up, then plain CLIP).
        self.eda = eda or EDA()
        self.image_size, self.crop_scale = image_size, crop_scale
        # On a CPU the data workers run beside the trainer, so they make the views; on a
        # GPU the trainer does, where it is cheap (the decision: views_here, by the caller).
        self.batch_views = BatchViews(image_size) if views_here else None
        self.eval = eval_transform(image_size)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._shard_counts = shard_counts

    # ---- planning (main process) --------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentations the next iteration yields."""
        self.epoch = epoch

    def shard_counts(self) -> list[int]:
        """Pairs per shard: from img2dataset stats when present, else by reading once."""
        if self._shard_counts is None:
            counts = []
            for shard in self.source.shards:
                if shard.count_hint is not None:
                    counts.append(shard.count_hint)
                else:
                    counts.append(sum(1 for _ in shard.pairs(Skips())))
            self._shard_counts = counts
        return self._shard_counts

    def shard_order(self, epoch: int) -> list[int]:
        """This rank's shards for `epoch`: all ranks shuffle alike, then take every
        world_size-th shard."""
        order = list(range(len(self.source.shards)))
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return order[self.rank::self.world_size]

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[int]:
        return self.shard_order(epoch)[worker::max(1, num_workers)]

    def batches_per_epoch(self, epoch: int, num_workers: int) -> int:
        """Exact batch count, given the shard counts (each worker batches its own pairs)."""
        counts = self.shard_counts()
        return sum(math.ceil(sum(counts[s] for s in self.worker_shards(epoch, w, num_workers)) / self.batch_size)
                   for w in range(max(1, num_workers)))

    def pairs_per_epoch(self) -> int:
        counts = self.shard_counts()
        return sum(counts[s] for s in self.shard_order(0))

    # ---- iteration (worker) -------------------------------------------------------

    def _samples(self, shards: list[int], rng: random.Random, skips: Skips) -> Iterator[tuple[int, object]]:
        """(sample seed, pair) in shuffle-buffer order."""
        buffer: list[tuple[int, object]] = []
        for shard_index in shards:
            for position, pair in enumerate(self.source.shards[shard_index].pairs(skips)):
                item = (sample_seed(self.seed, self.epoch, shard_index, position), pair)
                if not self.shuffle:
                    yield item
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                slot = rng.randrange(len(buffer))
                yield buffer[slot]
                buffer[slot] = item
        rng.shuffle(buffer)
        yield from buffer

    def _collate(self, items: list[tuple[int, object]], skips: Counter) -> dict:
        batch: dict = {"key": [pair.key for _, pair in items], "skips": dict(skips)}
        if self.views:
            images = torch.from_numpy(np.stack([base_image(pair.image, self.image_size) for _, pair in items]))
            params = torch.from_numpy(np.stack([draw_view_params(seed, self.image_size, self.crop_scale)
                                                for seed, _ in items]))
            if self.batch_views is not None:
                batch["image1"], batch["image2"] = self.batch_views(images, params)
            else:
                batch["image_u8"], batch["view_params"] = images, params
            text_views = [self.eda.views(pair.caption, seed) for seed, pair in items]
            batch["text1"] = self.tokenizer([t[0] for t in text_views])
            batch["text2"] = self.tokenizer([t[1] for t in text_views])
        if self.plain:
            batch["image"] = torch.stack([self.eval(pair.image) for _, pair in items])
            batch["text"] = self.tokenizer([pair.caption for _, pair in items])
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.worker_shards(self.epoch, worker, num_workers)
        rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        skips = Skips()
        reported: Counter = Counter()
        items: list = []
        for item in self._samples(shards, rng, skips):
            items.append(item)
            if len(items) == self.batch_size:
                new = skips.counts - reported
                reported = Counter(skips.counts)
                yield self._collate(items, new)
                items = []
        new = skips.counts - reported
        if items or new:
            yield self._collate(items, new) if items else {"key": [], "skips": dict(new)}


def make_loader(dataset: PairBatches, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ready-made batches. Its own generator keeps worker seeding
    from consuming the global torch RNG (our randomness is explicit anyway); its
    workers start from a fork server and exit with this process (sanitize.io.loader_workers)."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(dataset.seed),
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=exit_with_parent() if num_workers else None,
                      multiprocessing_context=worker_context() if num_workers else None)
