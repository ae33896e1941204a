"""Scoring every pair inside `safeclip pretrain`: the input of each epoch's split.

Two ways, both writing an Embeddings folder in embed's Parquet schema:
  `score_pass`            a separate no-grad pass with the eval transform (embed's own
                          code), each rank its share of the shards;
  `scores_from_training`  the embeddings the previous epoch's training pass computed for
                          the pairs it trained as plain pairs (the same inputs the pass
                          would embed, at the weights of their step), and a no-grad pass
                          over the other pairs only.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..defenses.balance import vectors_to_numpy
from ..io.artifacts import Embeddings, embedding_file_name
from ..io.pairs import PairSource, subset_source
from ..io.shards import atomic_write_bytes
from ..train.augment import eval_transform
from ..train.distributed import Dist, barrier, broadcast_object, gather_object
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
                         model: torch.nn.Module, tokenizer, image_size: int, source: PairSource, *, dtype: str,
                         batch_size: int, num_workers: int, ctx: Dist, device: torch.device,
                         checkpoint: str) -> dict[str, int]:
    """The next epoch's scores, written to `out` with the least work: the embeddings of the
    pairs this epoch trained as plain pairs (eval transform, caption as written: what the
    scoring pass computes) are `kept` from the training pass; every other pair (trained on
    augmented views, or not at all) is embedded by a no-grad pass over just those pairs.
    Rows keep the previous scores' order and columns. Every rank calls this (the pass is
    shared out like `score_pass`); rank 0 writes. Returns the two counts."""
    import pyarrow.parquet as pq

    rest = Embeddings(out.root.with_name(out.root.name + ".rest"))
    todo = None
    if ctx.is_main:
        shutil.rmtree(rest.root, ignore_errors=True)  # a killed run's leftovers are another model's embeddings
        todo = {path.stem: [k for k in pq.read_table(path, columns=["key"]).column("key").to_pylist()
                            if k not in kept] for path in previous.files()}
    todo = broadcast_object(ctx, todo)
    n_rest = sum(len(keys) for keys in todo.values())
    if n_rest:
        was_training = model.training
        embed_source(subset_source(source, todo), model, tokenizer, eval_transform(image_size), rest.root,
                     batch_size=batch_size, dtype="float32", num_workers=num_workers, device=str(device),
                     rank=ctx.rank, world_size=ctx.world_size)
        model.train(was_training)
        _share_files(ctx, rest.root, [embedding_file_name(s.name) for i, s in enumerate(source.shards)
                                      if i % ctx.world_size == ctx.rank])
    barrier(ctx)
    if ctx.is_main:
        out.root.mkdir(parents=True, exist_ok=True)
        for path in previous.files():
            table = pq.read_table(path)
            image = vectors_to_numpy(table.column("image_emb"), f"{path.name}: image_emb")
            text = vectors_to_numpy(table.column("text_emb"), f"{path.name}: text_emb")
            scored_now: dict = {}  # this file's pairs the no-grad pass embedded (never a copy of `kept`)
            if (rest.root / path.name).exists():
                scored = pq.read_table(rest.root / path.name, columns=["key", "image_emb", "text_emb"])
                scored_now = dict(zip(scored.column("key").to_pylist(),
                                      zip(vectors_to_numpy(scored.column("image_emb"), "image_emb"),
                                          vectors_to_numpy(scored.column("text_emb"), "text_emb"))))
            for row, key in enumerate(table.column("key").to_pylist()):
                image[row], text[row] = kept[key] if key in kept else scored_now[key]
            for name, column in embedding_columns(image, text, dtype).items():
                table = table.set_column(table.schema.get_field_index(name), name, column)
            write_embedding_file(table, out.root / path.name)
        shutil.rmtree(rest.root, ignore_errors=True)
        counts = {"from_training": previous.manifest().count - n_rest, "scored_now": n_rest}
        write_manifest(out.root, checkpoint=checkpoint, source=source, dtype=dtype, augment=False, seconds=0.0,
                       world_size=ctx.world_size, extra={"scored_by": "training pass (plain pairs) + no-grad pass "
                                                         "(the rest)", **counts})
    barrier(ctx)
    return {"from_training": len(kept), "scored_now": n_rest}
