"""Near-duplicate images in the safe set: at most one pair of each group.

Targeted poisoning's signature is many copies of one image, each with a caption of the
class the attacker wants it to take. A warm-up too short to recognise the target's
true class cannot tell those pairs from clean ones, so a high safe share lets whole
groups of copies into the CLIP loss (121-280 copies of 16 targets at 85-95% safe on a
20,000-pair proxy, docs/results.md). Keeping at most one pair of every group of
near-identical images in the safe set bounds what any such group can teach, whatever
the model currently believes; a genuine duplicate in clean data loses only its extra
copies, which teach little anyway. A group larger than `MAX_KEPT_GROUP` keeps none: many
copies of one image are the attack's signature, and the one kept copy of such a group, with
its adversarial caption, is still a poison.

Groups are connected components of the graph joining two pairs whose image embeddings,
centred (the mean embedding subtracted: after a short warm-up every embedding sits in a
narrow cone, where raw cosines are all near 1) and L2-normalised, have an inner
product of at least `tau` (faiss, exact inner product search of each pair's nearest
neighbours). Copies of one image embed identically (cosine 1 up to float16 storage);
at the default tau = 0.9999 distinct Fashion-MNIST images stay apart (their nearest
neighbours' centred cosine is below 0.9998 at the 99.9th percentile). Within a run the
groups are found once, at the first split, and reused by key (`groups_by_key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .balance import BATCH_ROWS, vectors_to_numpy

DEFAULT_TAU = 0.9999
# A group of more near-identical images than this keeps none in the safe set. Clean duplicates
# come in twos to fours here (the 60k benchmark: 15 pairs, one triple, one quadruple); targeted
# poisoning brings 25 copies, and one of them in the safe set every epoch flipped a target at
# 20% caption noise (docs/research.md, question 7).
MAX_KEPT_GROUP = 4
NEIGHBOURS = 32          # a group larger than this is still found whole: components join through members
# Up to this many pairs the search is exact (faiss flat inner product: time grows with the square
# of the pairs, about a minute at 1M on 2 cores); beyond, pairs are bucketed by SimHash codes.
EXACT_LIMIT = 1_000_000
HASH_TABLES, HASH_BITS = 4, 64


@dataclass
class Groups:
    """`labels[row]`: the group of each pair (a member row's index), -1 for a pair with no duplicate."""

    labels: np.ndarray
    tau: float

    @property
    def sizes(self) -> np.ndarray:
        members = self.labels[self.labels >= 0]
        return np.unique(members, return_counts=True)[1] if members.size else np.zeros(0, np.int64)

    def summary(self) -> dict:
        sizes = self.sizes
        return {"tau": self.tau, "groups": int(sizes.size), "pairs_in_groups": int(sizes.sum()),
                "largest_group": int(sizes.max()) if sizes.size else 0}


def write_groups(path: Path, keys: pa.ChunkedArray, labels: np.ndarray) -> None:
    """The grouped pairs' keys (`keys`: every pair's, in row order) and group numbers; pairs
    without a duplicate are left out."""
    grouped = np.flatnonzero(labels >= 0)
    table = pa.table({"key": keys.take(pa.array(grouped)), "group": pa.array(labels[grouped], pa.int64())})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def groups_by_key(path: Path, keys: pa.ChunkedArray, tau: float) -> Groups:
    """An earlier split's groups (`write_groups`) for the pairs `keys`, in their order: which
    images are copies of each other is a property of the data, so later splits reuse the
    groups found once on one model's embeddings instead of finding them again on embeddings
    that training-pass scoring took from different steps' weights (copies then drift apart)."""
    saved = pq.read_table(path, columns=["key", "group"])
    at = pc.index_in(keys, value_set=saved.column("key")).to_numpy(zero_copy_only=False)
    found = ~np.isnan(at)  # a key the earlier split did not group: no group
    labels = np.full(len(keys), -1, np.int64)
    labels[found] = saved.column("group").to_numpy()[at[found].astype(np.int64)]
    return Groups(labels, tau)


def _image_batches(paths: Sequence[str], track: Callable, description: str):
    for path in track(paths, len(paths), description):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=["image_emb"]):
            yield vectors_to_numpy(batch.column("image_emb"), f"{path} image_emb")


def _centred(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    x = x - mean
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Group labels from the edges of the duplicate graph: -1 for a pair with no edge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keep = rows != cols
    graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (rows[keep], cols[keep])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    return np.where(sizes[component] > 1, component, -1).astype(np.int64)


def _exact_edges(x: np.ndarray, tau: float, track: Callable) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within each row's NEIGHBOURS nearest at inner product >= tau (faiss, exact)."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    k = min(NEIGHBOURS, len(x))
    rows, cols = [], []
    for start in track(range(0, len(x), BATCH_ROWS), -(-len(x) // BATCH_ROWS), "finding near-duplicates"):
        sims, nbrs = index.search(x[start:start + BATCH_ROWS], k)
        r, c = np.nonzero((sims >= tau) & (nbrs >= 0))
        rows.append(r + start)
        cols.append(nbrs[r, c])
    return np.concatenate(rows), np.concatenate(cols)


def _hash_edges(paths: Sequence[str], mean: np.ndarray, dim: int, seed: int, track: Callable
                ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that share a SimHash code (signs of HASH_BITS random projections) in any of
    HASH_TABLES tables: copies always do; two vectors at inner product tau share one table's
    code with probability (1 - arccos(tau)/pi)^HASH_BITS (0.75 at tau 0.9999), so at least one
    of four with probability 0.996. Unrelated pairs collide about once in 2^64: no check."""
    planes = np.random.default_rng(seed).standard_normal((dim, HASH_TABLES * HASH_BITS)).astype(np.float32)
    weights = (np.uint64(1) << np.arange(HASH_BITS, dtype=np.uint64))
    codes = []
    for x in _image_batches(paths, track, "hashing image embeddings"):
        bits = (_centred(x, mean) @ planes > 0).reshape(len(x), HASH_TABLES, HASH_BITS)
        codes.append((bits.astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64))
    codes = np.concatenate(codes)
    rows, cols = [], []
    for table in range(HASH_TABLES):
        order = np.argsort(codes[:, table], kind="stable")
        same = codes[order[1:], table] == codes[order[:-1], table]
        rows.append(order[1:][same])
        cols.append(order[:-1][same])  # a chain through each bucket joins it into one component
    return np.concatenate(rows), np.concatenate(cols)


def find_groups(paths: Sequence[str], n_rows: int, tau: float = DEFAULT_TAU, seed: int = 0,
                track: Callable = lambda items, total, description: items, exact_limit: int = EXACT_LIMIT
                ) -> Groups:
    """Near-duplicate image groups of the pairs in the embedding files `paths`, in row order:
    exact search up to `exact_limit` pairs, SimHash buckets beyond (the memory and time then
    grow linearly: 8 bytes per pair and table)."""
    if not 0 < tau <= 1:
        raise ValueError(f"duplicate threshold tau must be in (0, 1], got {tau}")
    total, count, dim = None, 0, 0
    for x in _image_batches(paths, track, "averaging image embeddings"):
        total = x.sum(axis=0, dtype=np.float64) if total is None else total + x.sum(axis=0, dtype=np.float64)
        count, dim = count + len(x), x.shape[1]
    if count != n_rows:
        raise ValueError(f"near-duplicate groups: {count} image embeddings for {n_rows} pairs")
    if count < 2:
        return Groups(np.full(count, -1, np.int64), tau)
    mean = (total / count).astype(np.float32)
    if count <= exact_limit:
        x = _centred(np.concatenate(list(_image_batches(paths, track, "reading image embeddings"))), mean)
        rows, cols = _exact_edges(x, tau, track)
    else:
        rows, cols = _hash_edges(paths, mean, dim, seed, track)
    return Groups(_components(count, rows, cols), tau)


def one_per_group(order: np.ndarray, labels: np.ndarray, n_safe: int,
                  max_group: int = MAX_KEPT_GROUP) -> tuple[np.ndarray, int]:
    """The ranking `order` (row indices, most clean first) with every group's members after its
    best-ranked one moved behind the first `n_safe` rows that remain, and every member of a group
    larger than `max_group` with them, so the safe set holds at most one pair of a small group,
    none of a large one, and is still filled by the next-best pairs. Returns the new order and
    how many pairs left the safe set."""
    grouped = labels[order] >= 0
    first = np.zeros(len(order), dtype=bool)
    large = np.zeros(len(order), dtype=bool)
    if grouped.any():
        names, at, sizes = np.unique(labels[order][grouped], return_index=True, return_counts=True)
        first[np.flatnonzero(grouped)[at]] = True
        large[np.flatnonzero(grouped)] = np.isin(labels[order][grouped], names[sizes > max_group])
    extra = grouped & (~first | large)            # a group's second, third, ... member by rank; all of a large one
    allowed = order[~extra]
    out = np.concatenate([allowed[:n_safe], order[extra], allowed[n_safe:]])
    # With fewer allowed rows than n_safe (fraction:1, say) the best extra members fill the safe set again.
    refilled = max(0, n_safe - len(allowed))
    return out, max(0, int(np.count_nonzero(extra[:n_safe])) - refilled)
