"""How many pairs are mismatched? Estimated from the pairs themselves, for the `estimate` schedule.

A mismatched pair's similarity looks like that of an image with a random caption, and the
pairs themselves give that null: pair every sampled image with another sampled pair's caption
and score again. If a share w of the pairs is mismatched, the data's CDF is at least w times
the null's CDF wherever clean pairs are rare (the null's bulk), so the smallest ratio
data-CDF / null-CDF over the null's 5th-75th percentiles bounds w from above, and is close to
it when clean pairs seldom score that low. It errs high by the share of shuffled captions that
happen to fit their image (about 1/classes: 10 classes make it truth / 0.9), which keeps out a
little more than needed. The two-component mixture's clean weight is not
used: clean pairs of confusable classes form a long low tail that the fit assigns to the risky
side (measured in docs/research.md, question 6: 14-17% mismatched by the mixture where 3.2%
are, 3.0-3.3% by this estimate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from .balance import vectors_to_numpy

DEFAULT_SAMPLE = 200_000  # pairs whose embeddings are read: a share needs no more
NULL_QUANTILES = np.linspace(0.05, 0.75, 15)


@dataclass(frozen=True)
class MismatchEstimate:
    """The estimated share of mismatched pairs and what it was computed from."""

    share: float
    sample: int
    null_median: float

    def as_dict(self) -> dict:
        return {"share": round(self.share, 5), "sample": self.sample, "null_median": round(self.null_median, 5)}


def mismatched_share(image: np.ndarray, text: np.ndarray, similarity: np.ndarray,
                     seed: int = 0) -> MismatchEstimate:
    """The smallest data/null CDF ratio over the null's 5th-75th percentiles, in [0, 1].
    `image`, `text`: unit embeddings row-paired with `similarity` (their row-wise dot)."""
    n = len(similarity)
    if n < 2:
        raise ValueError(f"estimating the mismatched share needs at least 2 pairs, got {n}")
    # a plain permutation, not a derangement: a pair meeting its own caption (1/n of rows) is noise
    shuffled = text[np.random.default_rng(seed).permutation(n)]
    null = np.einsum("ij,ij->i", image.astype(np.float32), shuffled.astype(np.float32))
    data = np.sort(similarity)
    null_sorted = np.sort(null)
    cuts = np.quantile(null, NULL_QUANTILES)
    ratios = (np.searchsorted(data, cuts, side="left") / n) / np.maximum(
        np.searchsorted(null_sorted, cuts, side="left") / n, 1.0 / n)
    return MismatchEstimate(float(np.clip(ratios.min(), 0.0, 1.0)), n, float(np.median(null)))


def read_sample(paths: Sequence[str], rows_per_file: Sequence[int], rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of the given global row numbers (sorted), file by file, so
    that only the sample is held in memory."""
    images, texts = [], []
    start = 0
    for path, count in zip(paths, rows_per_file):
        lo, hi = np.searchsorted(rows, [start, start + count])
        if hi > lo:
            table = pq.read_table(path, columns=["image_emb", "text_emb"]).take(rows[lo:hi] - start)
            images.append(vectors_to_numpy(table.column("image_emb"), "image_emb"))
            texts.append(vectors_to_numpy(table.column("text_emb"), "text_emb"))
        start += count
    return np.concatenate(images), np.concatenate(texts)


def estimate_from_files(paths: Sequence[str], rows_per_file: Sequence[int], similarity: np.ndarray,
                        seed: int = 0, sample: int = DEFAULT_SAMPLE) -> MismatchEstimate:
    """`mismatched_share` over a seeded sample of the pairs with a finite similarity."""
    usable = np.flatnonzero(np.isfinite(similarity))
    if usable.size > sample:
        usable = np.sort(np.random.default_rng(seed).choice(usable, size=sample, replace=False))
    image, text = read_sample(paths, rows_per_file, usable)
    return mismatched_share(image, text, similarity[usable], seed=seed)
