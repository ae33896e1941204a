"""Near-duplicate images in the safe set: at most one pair of each group.

Targeted poisoning's signature is many copies of one image, each with a caption of the
class the attacker wants it to take. A warm-up too short to recognise the target's
true class cannot tell those pairs from clean ones, so a high safe share lets whole
groups of copies into the CLIP loss (121-280 copies of 16 targets at 85-95% safe on a
20,000-pair proxy, docs/results.md). Keeping at most one pair of every group of
near-identical images in the safe set bounds what any such group can teach, whatever
the model currently believes; a genuine duplicate in clean data loses only its extra
copies, which teach little anyway.

Groups are connected components of the graph joining two pairs whose image embeddings,
centred (the mean embedding subtracted: after a short warm-up every embedding sits in a
narrow cone, where raw cosines are all near 1) and L2-normalised, have an inner
product of at least `tau` (faiss, exact inner product search of each pair's nearest
neighbours). Copies of one image embed identically (cosine 1 up to float16 storage);
at the default tau = 0.9999 distinct Fashion-MNIST images stay apart (their nearest
neighbours' centred cosine is below 0.9998 at the 99.9th percentile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow.parquet as pq

from .balance import BATCH_ROWS, vectors_to_numpy

DEFAULT_TAU = 0.9999
NEIGHBOURS = 32          # a group larger than this is still found whole: components join through members


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


def _image_embeddings(paths: Sequence[str], n_rows: int, track: Callable) -> np.ndarray:
    parts = []
    for path in track(paths, len(paths), "reading image embeddings"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=["image_emb"]):
            parts.append(vectors_to_numpy(batch.column("image_emb"), f"{path} image_emb"))
    x = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    if len(x) != n_rows:
        raise ValueError(f"near-duplicate groups: {len(x)} image embeddings for {n_rows} pairs")
    return x


def find_groups(paths: Sequence[str], n_rows: int, tau: float = DEFAULT_TAU,
                track: Callable = lambda items, total, description: items) -> Groups:
    """Near-duplicate image groups of the pairs in the embedding files `paths`, in row order."""
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not 0 < tau <= 1:
        raise ValueError(f"duplicate threshold tau must be in (0, 1], got {tau}")
    x = _image_embeddings(paths, n_rows, track)
    if len(x) < 2:
        return Groups(np.full(len(x), -1, np.int64), tau)
    x -= x.mean(axis=0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    k = min(NEIGHBOURS, len(x))
    rows, cols = [], []
    for start in track(range(0, len(x), BATCH_ROWS), -(-len(x) // BATCH_ROWS), "finding near-duplicates"):
        sims, nbrs = index.search(x[start:start + BATCH_ROWS], k)
        r, c = np.nonzero((sims >= tau) & (nbrs >= 0))
        rows.append(r + start)
        cols.append(nbrs[r, c])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(len(x), len(x)))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    labels = np.where(sizes[component] > 1, component, -1).astype(np.int64)
    return Groups(labels, tau)


def one_per_group(order: np.ndarray, labels: np.ndarray, n_safe: int) -> tuple[np.ndarray, int]:
    """The ranking `order` (row indices, most clean first) with every group's members after its
    best-ranked one moved behind the first `n_safe` rows that remain, so the safe set holds at
    most one pair of a group and is still filled by the next-best pairs. Returns the new order
    and how many pairs left the safe set."""
    grouped = labels[order] >= 0
    first = np.zeros(len(order), dtype=bool)
    if grouped.any():
        _, at = np.unique(labels[order][grouped], return_index=True)
        first[np.flatnonzero(grouped)[at]] = True
    extra = grouped & ~first                      # a group's second, third, ... member by rank
    allowed = order[~extra]
    out = np.concatenate([allowed[:n_safe], order[extra], allowed[n_safe:]])
    # With fewer allowed rows than n_safe (fraction:1, say) the best extra members fill the safe set again.
    refilled = max(0, n_safe - len(allowed))
    return out, max(0, int(np.count_nonzero(extra[:n_safe])) - refilled)
