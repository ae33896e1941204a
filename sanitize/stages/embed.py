"""Embedding every pair with a checkpoint: one Parquet file per input shard.

Each DataLoader worker takes whole shards (worker i reads shards i, i+W, …), so
decoding runs in workers and batches never mix shards. When a process has fewer
shards than workers, each shard is read in lanes (io/pairs.py: every worker reads the
shard's bytes and decodes every W-th pair), so a one-file source still decodes on
every worker; a shard's file is written once all its lanes are done, its rows put back
in reading order. The output is identical whatever the number of workers or processes.
Under `torchrun`, rank r embeds shards r, r+R, … and rank 0 writes `embed.json`.
A shard's file is written atomically when its last batch is done; a rerun skips
shards whose file exists, so a killed run resumes where it stopped. `run_embed`
first records what makes the folder (`embed_identity`: checkpoint hash, source,
options) and refuses to resume or rewrite a folder made with anything else
(`Embeddings.prepare`); embed.json is written last, once every file is there and
the keys are unique. DataLoader workers exit with the process that started them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..io.artifacts import EmbedManifest, Embeddings, check_unique_keys, embedding_file_name, file_sha256
from ..io.pairs import CsvOptions, PairSource, Shard, Skips, open_pairs
from ..io.shards import atomic_write_bytes
from ..io.loader_workers import exit_with_parent, worker_context
from ..models.factory import encode_pairs
from ..train import distributed
from .config import DTYPES, EmbedConfig



@dataclass
class _ShardDone:
    """Marker a worker yields after a shard's (or a lane of it) last batch, with its skip counts."""

    shard_index: int
    count: int
    skips: Skips


@dataclass
class _Batch:
    shard_index: int
    positions: list[int]
    keys: list[str]
    captions: list[str]
    metas: list[dict]
    images: torch.Tensor
    tokens: torch.Tensor


class _ShardBatches(torch.utils.data.IterableDataset):
    """Yields batches of decoded, transformed pairs, one shard at a time per worker."""

    def __init__(self, shards: list[tuple[int, Shard]], transform: Callable, tokenizer: Callable,
                 batch_size: int):
        self.shards = shards
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[_Batch | _ShardDone]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for position, (index, shard) in enumerate(self.shards):
            if position % workers != worker:
                continue
            skips = Skips()
            buffer: list = []
            count = 0
            for pair in shard.pairs(skips):
                buffer.append(pair)
                if len(buffer) == self.batch_size:
                    yield self._batch(index, buffer)
                    count += len(buffer)
                    buffer = []
            if buffer:
                yield self._batch(index, buffer)
                count += len(buffer)
            yield _ShardDone(index, count, skips)

    def _batch(self, index: int, pairs: list) -> _Batch:
        images = torch.stack([self.transform(p.image) for p in pairs])
        captions = [p.caption for p in pairs]
        return _Batch(index, [p.position for p in pairs], [p.key for p in pairs], captions,
                      [p.meta for p in pairs], images, self.tokenizer(captions))


def lanes_for(shards: int, workers: int) -> int:
    """How many lanes each shard is read in: enough to give every worker a part when there
    are fewer shards than workers, one otherwise."""
    return max(1, workers // shards) if shards else 1


def _in_order(parts: dict[str, list]) -> dict[str, list]:
    """A shard's rows, gathered from its lanes, back in reading order."""
    order = np.argsort(np.asarray(parts["positions"], dtype=np.int64), kind="stable")
    image = np.concatenate(parts["image"])[order]
    text = np.concatenate(parts["text"])[order]
    pick = lambda values: [values[i] for i in order]  # noqa: E731
    return {"keys": pick(parts["keys"]), "captions": pick(parts["captions"]), "metas": pick(parts["metas"]),
            "image": [image], "text": [text]}


def _scalar_meta(metas: list[dict]) -> dict[str, list]:
    """Source metadata columns worth keeping: scalars only, union over rows."""
    skip = {"key", "caption", "image_emb", "text_emb", "similarity"}
    names = sorted({k for m in metas for k, v in m.items()
                    if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))})
    columns = {}
    for name in names:
        values = [m.get(name) for m in metas]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            values = [None if v is None else str(v) for v in values]  # mixed types: keep as text
        columns[name] = values
    return columns


def embedding_columns(image_emb: np.ndarray, text_emb: np.ndarray, dtype: str) -> dict:
    """image_emb, text_emb (fixed-size lists in `dtype`) and their cosine `similarity` (float32)."""
    import pyarrow as pa

    similarity = np.einsum("nd,nd->n", image_emb.astype(np.float32), text_emb.astype(np.float32))
    dim = image_emb.shape[1]
    np_dtype = np.float16 if dtype == "float16" else np.float32
    arrow_type = pa.float16() if dtype == "float16" else pa.float32()

    def vectors(matrix: np.ndarray):
        flat = pa.array(np.ascontiguousarray(matrix, dtype=np_dtype).reshape(-1), type=arrow_type)
        return pa.FixedSizeListArray.from_arrays(flat, dim)

    return {"image_emb": vectors(image_emb), "text_emb": vectors(text_emb),
            "similarity": pa.array(similarity.astype(np.float32), pa.float32())}


def embedding_table(keys: list[str], captions: list[str], metas: list[dict], image_emb: np.ndarray,
                    text_emb: np.ndarray, dtype: str):
    """The Parquet schema every later stage reads (see docs/pipeline.md)."""
    import pyarrow as pa

    meta = _scalar_meta(metas)
    columns = {"key": pa.array(keys, pa.string()), "caption": pa.array(captions, pa.string()),
               "url": pa.array(meta.pop("url", [None] * len(keys)), pa.string())}
    for name, values in meta.items():
        columns[name] = pa.array(values)
    columns.update(embedding_columns(image_emb, text_emb, dtype))
    return pa.table(columns)


def write_embedding_file(table, path: str | os.PathLike) -> None:
    """One embedding file, compressed, written atomically (a killed write leaves no file)."""
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class EmbedResult:
    shards_done: int = 0
    shards_skipped: int = 0  # already written by an earlier run
    pairs: int = 0
    seconds: float = 0.0
    skips: Skips = field(default_factory=Skips)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


def embed_source(source: PairSource, model: torch.nn.Module, tokenizer: Callable, transform: Callable,
                 out_dir: str | os.PathLike, *, batch_size: int = 256, dtype: str = "float16",
                 num_workers: int = 2, device: str = "cpu", rank: int = 0, world_size: int = 1,
                 on_batch: Callable[[int], None] | None = None, lanes: bool = True) -> EmbedResult:
    """Embed this rank's shards of `source` into `out_dir`; returns what was done here.
    `lanes`: read shards in lanes when they are fewer than the workers (off for a source
    whose repeated keys are renamed: the n-th occurrence must be counted in one reader)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose float16 or float32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [embedding_file_name(s.name) for s in source.shards]
    if len(set(names)) != len(names):
        raise ValueError("two input shards have the same name; embed them into separate folders")
    result = EmbedResult()
    todo = []
    for index, shard in enumerate(source.shards):
        if index % world_size != rank:
            continue
        if (out / names[index]).exists():
            result.shards_skipped += 1
        else:
            todo.append((index, shard))
    if not todo:
        return result

    per_shard = lanes_for(len(todo), num_workers) if lanes else 1
    units = [(index, shard.in_lane(lane, per_shard)) for index, shard in todo for lane in range(per_shard)]
    dataset = _ShardBatches(units, transform, tokenizer, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         persistent_workers=False, worker_init_fn=exit_with_parent(),
                                         multiprocessing_context=worker_context() if num_workers else None)
    pending: dict[int, dict[str, list]] = {}
    lanes_done: dict[int, int] = {}
    model = model.to(device).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for item in loader:
            if isinstance(item, _ShardDone):
                result.skips.merge(item.skips)
                lanes_done[item.shard_index] = lanes_done.get(item.shard_index, 0) + 1
                if lanes_done[item.shard_index] < per_shard:
                    continue
                parts = pending.pop(item.shard_index, None)
                if parts is None:  # a shard with no readable pair still gets its (empty) file
                    parts = _empty_parts()
                elif per_shard > 1:
                    parts = _in_order(parts)
                dim = _embed_dim(model)
                image_emb = np.concatenate(parts["image"]) if parts["image"] else np.zeros((0, dim), np.float32)
                text_emb = np.concatenate(parts["text"]) if parts["text"] else np.zeros((0, dim), np.float32)
                table = embedding_table(parts["keys"], parts["captions"], parts["metas"], image_emb,
                                        text_emb, dtype)
                write_embedding_file(table, out / names[item.shard_index])
                result.shards_done += 1
                continue
            image_emb, text_emb = encode_pairs(model, item.images.to(device), item.tokens.to(device))
            parts = pending.setdefault(item.shard_index, _empty_parts())
            parts["positions"] += item.positions
            parts["keys"] += item.keys
            parts["captions"] += item.captions
            parts["metas"] += item.metas
            parts["image"].append(image_emb.float().cpu().numpy())
            parts["text"].append(text_emb.float().cpu().numpy())
            result.pairs += len(item.keys)
            if on_batch:
                on_batch(len(item.keys))
    result.seconds = time.perf_counter() - start
    return result


def _empty_parts() -> dict[str, list]:
    return {"positions": [], "keys": [], "captions": [], "metas": [], "image": [], "text": []}


def _embed_dim(model: torch.nn.Module) -> int:
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return projection.shape[-1]
    if hasattr(projection, "out_features"):
        return projection.out_features
    return int(getattr(model, "embed_dim", 0) or 0)


def _source_path(source: PairSource) -> str:
    return os.path.abspath(source.root) if not any(c in source.root for c in "{*?") else source.root


def embed_identity(checkpoint: str | os.PathLike, source: PairSource, config: EmbedConfig,
                   csv_options: CsvOptions | None = None) -> dict:
    """What makes an embedding folder's files what they are: a rerun with another identity
    must not resume into the folder or rewrite its embed.json."""
    identity = {"checkpoint_sha256": file_sha256(checkpoint), "checkpoint_path": os.path.abspath(checkpoint),
                "source": _source_path(source), "source_format": source.format, "dtype": config.dtype,
                "augment": config.augment, "duplicate_keys": config.duplicate_keys}
    if config.augment:
        identity["seed"] = config.seed
    if source.format == "csv":
        options = csv_options or CsvOptions()
        identity["csv"] = {"image_column": options.image_column, "caption_column": options.caption_column}
    return identity


def write_manifest(out_dir: str | os.PathLike, *, checkpoint: str, source: PairSource, dtype: str,
                   augment: bool, seconds: float, world_size: int, extra: dict | None = None,
                   duplicate_keys: str = "error", identity: dict | None = None) -> EmbedManifest:
    """Rank 0 writes embed.json once every shard file exists and no key repeats."""
    import pyarrow.parquet as pq

    folder = Embeddings(out_dir)
    files = [folder.file_for(s.name) for s in source.shards]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"embedding incomplete: {len(missing)} shard file(s) missing, e.g. {missing[0]}")
    check_unique_keys(files, out_dir, "fix the source, or embed it again with --duplicate-keys rename --force")
    count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    dim = pq.ParquetFile(files[0]).schema_arrow.field("image_emb").type.list_size
    manifest = EmbedManifest(
        checkpoint=os.path.abspath(checkpoint), source=_source_path(source),
        source_format=source.format, dtype=dtype, dim=dim, augment=augment, count=count,
        shards=[f.name for f in files], seconds=round(seconds, 3), world_size=world_size,
        duplicate_keys=duplicate_keys, identity=dict(identity or {}), extra=dict(extra or {}))
    folder.write_manifest(manifest)
    return manifest


# ---- the stage ----------------------------------------------------------------------------

@dataclass
class EmbedRun:
    """What `run_embed` did on this process; `manifest` on rank 0 only."""

    result: EmbedResult
    rank: int
    world_size: int
    manifest: EmbedManifest | None


def run_embed(src: str, checkpoint: str | os.PathLike | None, out: str | os.PathLike, config: EmbedConfig, *,
              model: str | None = None, pretrained: str | os.PathLike | None = None,
              source_format: str | None = None, csv_options: CsvOptions | None = None,
              on_batch: Callable[[int], None] | None = None, force: bool = False) -> EmbedRun:
    """The `safeclip embed` stage: every pair of `src` embedded into `out` with a safeclip
    checkpoint, or with `model` + local open_clip weights `pretrained` (checkpoint None; see
    `models.checkpoint.load_model`), one share of the shards per process under torchrun;
    rank 0 writes embed.json last. A folder made with other weights, another source or other
    options is refused (`force` clears it)."""
    from ..models.checkpoint import load_model
    from ..train.augment import eval_transform
    from ..train.views import SeededView

    config.validate()
    distributed.resolve_device(config.device)  # no CUDA, or a bogus name: one line before any work
    source = open_pairs(src, format=source_format, csv_options=csv_options, duplicate_keys=config.duplicate_keys)
    loaded = load_model(checkpoint, model=model, pretrained=pretrained)
    model, tokenizer, image_size = loaded.model, loaded.tokenizer, loaded.image_size
    checkpoint = loaded.path
    origin = {} if loaded.weights == "safeclip" else {"model": loaded.config.get("name"), "weights": "open_clip"}
    with distributed.session(config.device) as ctx:
        device = distributed.resolve_device(config.device, ctx)
        folder = Embeddings(out)
        identity = {**embed_identity(checkpoint, source, config, csv_options), **origin} if ctx.is_main else None
        state, error = None, None
        if ctx.is_main:
            try:
                state = folder.prepare(identity, force=force)
            except (FileExistsError, ValueError) as exc:
                error = exc
        state, error = distributed.broadcast_object(ctx, (state, error))
        if error is not None:
            raise error
        workers = distributed.default_workers() if config.workers is None else config.workers
        distributed.use_threads(config.threads, workers)
        transform = SeededView(image_size, config.seed + ctx.rank) if config.augment else eval_transform(image_size)
        result = embed_source(source, model, tokenizer, transform, out, batch_size=config.batch_size,
                              dtype=config.dtype, num_workers=workers, device=str(device), rank=ctx.rank,
                              world_size=ctx.world_size, on_batch=on_batch,
                              lanes=config.duplicate_keys == "error")
        distributed.barrier(ctx)
        manifest = None
        if ctx.is_main and state == "done" and not result.shards_done:
            manifest = folder.manifest()  # finished with this identity: kept as it is
        elif ctx.is_main:
            manifest = write_manifest(out, checkpoint=str(checkpoint), source=source, dtype=config.dtype,
                                      augment=config.augment, seconds=result.seconds, world_size=ctx.world_size,
                                      extra={"pairs_per_second_rank0": round(result.pairs_per_second, 1),
                                             "skips_rank0": result.skips.as_dict(), **origin},
                                      duplicate_keys=config.duplicate_keys, identity=identity)
        return EmbedRun(result, ctx.rank, ctx.world_size, manifest)
