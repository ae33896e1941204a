"""Balanced ranking for the split: take the top share of `p_clean` inside each cluster.

Why: a global ranking by `p_clean` fills the safe set with the easy concepts (pairs that
are easy to match score high similarities), so hard concepts barely get cross-modal
training (a Fashion-MNIST trial: 66% of trouser pairs safe vs 5% of shirt pairs at
r = 0.3; docs/split.md). Here
the pairs are clustered with faiss spherical k-means, and every cluster contributes
its share of the safe count, picked by `p_clean` inside the cluster.

The mixture and `p_clean` stay global; only *which* pairs fill the safe count changes.
The count itself (`n_safe`) comes from the ratio schedule, unchanged.

Memory: the embeddings are never all loaded. k-means trains on a seeded sample of at
most `sample` rows; every row is then assigned to its nearest centroid batch by batch,
keeping only one small int per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CLUSTER_ON = ("joint", "image", "text")
BATCH_ROWS = 16_384  # rows of embeddings decoded at once: ~0.3 GB peak at 2 x 128-d, as fast as 65k
FEW_POINTS = 39  # faiss's own advice: at least 39 training points per centroid


@dataclass(frozen=True)
class BalanceOptions:
    """Options of the balanced ranking (CLI: --clusters, --cluster-on, --cluster-sample)."""

    clusters: int = 10
    cluster_on: str = "joint"   # joint = L2-normalised [image, text]; text alone groups by template
    sample: int = 200_000       # k-means trains on a seeded sample of at most this many rows
    niter: int = 20             # k-means iterations

    @classmethod
    def from_mapping(cls, options: Mapping | None) -> "BalanceOptions":
        """Validated options; unknown names and bad values raise ValueError."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown balanced-ranking option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        opts = cls(**options)
        if not isinstance(opts.clusters, int) or opts.clusters < 1:
            raise ValueError(f"--clusters must be a positive integer, got {opts.clusters!r}")
        if opts.cluster_on not in CLUSTER_ON:
            raise ValueError(f"--cluster-on must be one of {', '.join(CLUSTER_ON)}, got {opts.cluster_on!r}")
        if not isinstance(opts.sample, int) or opts.sample < opts.clusters:
            raise ValueError(f"--cluster-sample must be at least --clusters ({opts.clusters}), got {opts.sample!r}")
        if not isinstance(opts.niter, int) or opts.niter < 1:
            raise ValueError(f"k-means niter must be a positive integer, got {opts.niter!r}")
        return opts


# ---- reading features batch by batch ------------------------------------------------

def _columns_for(cluster_on: str) -> list[str]:
    return {"joint": ["image_emb", "text_emb"], "image": ["image_emb"], "text": ["text_emb"]}[cluster_on]


def _raw_vectors(column: pa.Array | pa.ChunkedArray, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, d) numpy view of equal-length vectors in their stored dtype, plus the validity
    mask when some vectors are null (their slots hold arbitrary values)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    n = len(column)
    if pa.types.is_fixed_size_list(kind):
        d = kind.list_size
        values = column.values.slice(column.offset * d, n * d)  # keeps null slots, so rows stay aligned
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if column.null_count or n and (lengths != lengths[0]).any():
            raise ValueError(f"{what}: embedding vectors must all have the same length and none may be null")
        d = int(lengths[0]) if n else 0
        values = column.flatten()
    else:
        raise ValueError(f"{what}: expected a column of float vectors, got {kind}")
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
    return values.to_numpy(zero_copy_only=False).reshape(n, d), valid


def vectors_to_numpy(column: pa.Array | pa.ChunkedArray, what: str) -> np.ndarray:
    """An Arrow column of equal-length float vectors as an (n, d) float32 matrix.
    Null vectors become zero rows (they carry no direction)."""
    raw, valid = _raw_vectors(column, what)
    x = raw.astype(np.float32)
    if valid is not None:
        x[~valid] = 0.0
    return x


def _unit_(x: np.ndarray) -> None:
    """Scale rows of x to unit norm in place (x may be a column slice of a larger
    matrix); rows that are zero or hold NaN/inf become zero rows."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = ~(np.isfinite(norm) & (norm > 0))
    if bad.any():
        x[bad] = 0.0
        norm[bad] = 1.0
    x /= norm[:, None]


def batch_features(batch: pa.RecordBatch, cluster_on: str, what: str) -> np.ndarray:
    """Unit-norm clustering features of one batch: image, text, or both concatenated.
    Each tower is normalised first so neither dominates the joint vector; the towers
    are cast straight into one float32 matrix (no intermediate copies)."""
    raws = [_raw_vectors(batch.column(c), f"{what} {c}") for c in _columns_for(cluster_on)]
    widths = [raw.shape[1] for raw, _ in raws]
    x = np.empty((batch.num_rows, sum(widths)), dtype=np.float32)
    at = 0
    for (raw, valid), width in zip(raws, widths):
        part = x[:, at:at + width]
        part[...] = raw
        if valid is not None:
            part[~valid] = 0.0
        _unit_(part)
        at += width
    if len(raws) > 1:
        _unit_(x)
    return x


def _check_columns(paths: Sequence[str], cluster_on: str) -> None:
    for path in paths:
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in _columns_for(cluster_on) if c not in names]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} column; the balanced ranking clusters the "
                             "embeddings, so keep them in the embed output")


def _iter_features(paths: Sequence[str], cluster_on: str, track: Callable, description: str,
                   wanted: Callable[[int, int], bool] = lambda start, stop: True):
    """Yield (start_row, features) for every batch of every file, in input order.
    `wanted(start, stop)` lets a caller skip files that hold none of its rows."""
    start = 0
    for path in track(paths, len(paths), description):
        meta = pq.ParquetFile(path)
        rows = meta.metadata.num_rows
        if wanted(start, start + rows):
            for batch in meta.iter_batches(batch_size=BATCH_ROWS, columns=_columns_for(cluster_on)):
                yield start, batch_features(batch, cluster_on, path)
                start += batch.num_rows
        else:
            start += rows


def _identity_track(items: Iterable, total: int | None, description: str) -> Iterable:
    return items


# ---- clustering -----------------------------------------------------------------------

@dataclass
class Clustering:
    labels: np.ndarray       # per row: cluster id (int16/int32), -1 for rows not clustered
    centroids: np.ndarray    # (k, d) float32, unit norm
    n_train: int
    objective: float         # final k-means objective (sum of cosine similarities to centroids)


def cluster_rows(paths: Sequence[str], n_rows: int, eligible: np.ndarray, options: BalanceOptions,
                 seed: int = 0, track: Callable = _identity_track) -> Clustering:
    """Train spherical k-means on a seeded sample of the eligible rows, then assign every
    eligible row to its nearest centroid (rows that are not eligible get -1)."""
    import faiss

    _check_columns(paths, options.cluster_on)
    usable = np.flatnonzero(eligible)
    k = options.clusters
    if usable.size < k:
        raise ValueError(f"--clusters {k} is more than the {usable.size} pairs that have a similarity")
    if usable.size <= options.sample:
        pick = usable
    else:
        rng = np.random.default_rng(seed)
        pick = np.sort(usable[rng.choice(usable.size, size=options.sample, replace=False)])

    # Pass 1: gather the training rows. When every row is a training row, the training
    # matrix is all rows in input order and is assigned from memory (one pass only).
    everything = pick.size == n_rows
    train, end = None, 0  # train is filled in place: no list of chunks, no concatenated copy
    for start, feats in _iter_features(
            paths, options.cluster_on, track, "reading embeddings for k-means",
            wanted=lambda a, b: np.searchsorted(pick, a) < np.searchsorted(pick, b)):
        if train is None:
            train = np.empty((pick.size, feats.shape[1]), dtype=np.float32)
        elif feats.shape[1] != train.shape[1]:
            raise ValueError(f"embedding width changes between files ({train.shape[1]} vs {feats.shape[1]})")
        lo, hi = np.searchsorted(pick, start), np.searchsorted(pick, start + feats.shape[0])
        if hi > lo:
            train[lo:hi] = feats[pick[lo:hi] - start]
        end = start + feats.shape[0]
    if train is None or end > n_rows or (everything and end != n_rows):
        raise ValueError(f"embedding files changed while clustering ({end} rows read, {n_rows} expected)")
    d = train.shape[1]

    # faiss subsamples to k * max_points_per_centroid on its own; raise that cap so it
    # trains on exactly our seeded sample (the size split.json records). Its "too few
    # points" message would go to stderr from C++; the caller warns instead (FEW_POINTS).
    kmeans = faiss.Kmeans(d, k, niter=options.niter, spherical=True, seed=seed, verbose=False,
                          max_points_per_centroid=max(256, math.ceil(train.shape[0] / k) + 1),
                          min_points_per_centroid=1)
    kmeans.train(train)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    objective = float(kmeans.obj[-1]) if len(kmeans.obj) else float("nan")

    index = faiss.IndexFlatIP(d)
    index.add(centroids)
    labels = np.full(n_rows, -1, dtype=np.int16 if k <= np.iinfo(np.int16).max else np.int32)

    def assign(start: int, feats: np.ndarray) -> None:
        _, nearest = index.search(feats, 1)
        rows = slice(start, start + feats.shape[0])
        labels[rows] = np.where(eligible[rows], nearest[:, 0], -1)

    # Pass 2 (only when the sample was not everything): stream and assign.
    seen = 0
    if everything:
        for start in range(0, n_rows, BATCH_ROWS):
            assign(start, train[start:start + BATCH_ROWS])
        seen = n_rows
    else:
        del train
        for start, feats in _iter_features(paths, options.cluster_on, track, "assigning clusters"):
            assign(start, feats)
            seen = start + feats.shape[0]
    if seen != n_rows:
        raise ValueError(f"embedding files changed while clustering ({seen} rows read, {n_rows} expected)")
    return Clustering(labels, centroids, int(pick.size), objective)


# ---- the balanced cut -------------------------------------------------------------------

def cluster_quotas(sizes: np.ndarray, n_safe: int) -> np.ndarray:
    """How many safe pairs each cluster gives: r * size with r = n_safe / sum(sizes),
    rounded by largest remainder (ties: lower cluster id first) so the quotas sum to
    exactly n_safe and each is floor or ceil of r * size (never more than size)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not 0 <= n_safe <= total:
        raise ValueError(f"cannot pick {n_safe} safe pairs from {total}")
    if total == 0:
        return np.zeros_like(sizes)
    scaled = sizes * np.int64(n_safe)          # exact integers: no float rounding drift
    quota, remainder = scaled // total, scaled % total
    left = n_safe - int(quota.sum())
    if left:
        winners = np.lexsort((np.arange(sizes.size), -remainder))[:left]
        quota[winners] += 1
    return quota


def balanced_order(global_order: np.ndarray, labels: np.ndarray, n_clusters: int,
                   n_safe: int) -> tuple[np.ndarray, np.ndarray]:
    """A total row order whose first n_safe rows are the balanced safe set.

    `global_order` is the global ranking (most clean first); rows with label -1 are never
    safe. Each cluster's quota is filled by its best rows in the global order; the safe
    rows come first, then the rest, each part in global order, so the result is as
    deterministic as the global ranking. Returns (order, quotas)."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels[labels >= 0], minlength=n_clusters)[:n_clusters]
    quota = cluster_quotas(sizes, n_safe)
    ranked = labels[global_order].astype(np.int64)
    ranked[ranked < 0] = n_clusters                       # an extra bucket with quota 0
    # Position of each row among the rows of its cluster, in global order.
    by_cluster = np.argsort(ranked, kind="stable")
    first = np.searchsorted(ranked[by_cluster], np.arange(n_clusters + 1))
    position = np.empty(ranked.size, dtype=np.int64)
    position[by_cluster] = np.arange(ranked.size) - first[ranked[by_cluster]]
    safe = position < np.append(quota, 0)[ranked]
    order = np.concatenate([global_order[safe], global_order[~safe]])
    return order, quota
