"""Scoring every pair inside `safeclip pretrain`: the input of each epoch's split.

Two ways, both writing an Embeddings folder in embed's Parquet schema:
  `score_pass`            a separate no-grad pass with the eval transform (embed's own
                          code), each rank its share of the shards;
  `scores_from_training`  the view-1 embeddings the previous epoch's training pass
                          already computed (no extra forward pass), written over the
                          previous scores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..defenses.balance import vectors_to_numpy
from ..io.artifacts import Embeddings, embedding_file_name
from ..io.pairs import PairSource
from ..io.shards import atomic_write_bytes
from ..train.augment import eval_transform
from ..train.distributed import Dist, barrier, gather_object
from .embed import embed_source, embedding_columns, write_embedding_file, write_manifest


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
    received = gather_object(ctx, mine if ctx.rank else {})
    if ctx.is_main and received:
        for files in received:
            for name, data in files.items():
                if not (folder / name).exists():
                    atomic_write_bytes(folder / name, data)


def score_pass(source: PairSource, model: torch.nn.Module, tokenizer, image_size: int, out: Embeddings, *,
               batch_size: int, dtype: str, num_workers: int, ctx: Dist, device: torch.device, checkpoint: str,
               on_batch: Callable[[int], None] | None = None) -> float:
    """The separate no-grad scoring pass, each rank its shards; returns seconds."""
    started = time.perf_counter()
    was_training = model.training
    embed_source(source, model, tokenizer, eval_transform(image_size), out.root, batch_size=batch_size,
                 dtype=dtype, num_workers=num_workers, device=str(device), rank=ctx.rank,
                 world_size=ctx.world_size, on_batch=on_batch)
    model.train(was_training)
    mine = [embedding_file_name(s.name) for i, s in enumerate(source.shards) if i % ctx.world_size == ctx.rank]
    _share_files(ctx, out.root, mine)
    barrier(ctx)
    if ctx.is_main:
        write_manifest(out.root, checkpoint=checkpoint, source=source, dtype=dtype, augment=False,
                       seconds=time.perf_counter() - started, world_size=ctx.world_size,
                       extra={"scored_by": "separate pass"})
    return time.perf_counter() - started


def scores_from_training(kept: dict[str, tuple[np.ndarray, np.ndarray]], previous: Embeddings, out: Embeddings,
                         dtype: str, checkpoint: str, source: PairSource, world_size: int) -> int:
    """Write the next epoch's score files from embeddings the training pass kept.

    Rows (key, caption, metadata) come from the previous scores; image_emb, text_emb
    and similarity are replaced for every kept key. A pair the training pass did not
    see (dropped from a rank's last partial batch under torchrun) keeps its previous
    score. Returns the number of pairs rescored."""
    import pyarrow.parquet as pq

    out.root.mkdir(parents=True, exist_ok=True)
    rescored = 0
    for path in previous.files():
        table = pq.read_table(path)
        image = vectors_to_numpy(table.column("image_emb"), f"{path.name}: image_emb")
        text = vectors_to_numpy(table.column("text_emb"), f"{path.name}: text_emb")
        for row, key in enumerate(table.column("key").to_pylist()):
            hit = kept.get(key)
            if hit is not None:
                image[row], text[row] = hit
                rescored += 1
        for name, column in embedding_columns(image, text, dtype).items():
            table = table.set_column(table.schema.get_field_index(name), name, column)
        write_embedding_file(table, out.root / path.name)
    write_manifest(out.root, checkpoint=checkpoint, source=source, dtype=dtype, augment=True, seconds=0.0,
                   world_size=world_size, extra={"scored_by": "training pass (view 1, weights of the step)",
                                                 "rescored": rescored})
    return rescored
