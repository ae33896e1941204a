"""benchmarks/clean_share.py: the shuffled-caption null estimates the mismatched share of
pairs whose clean similarities sit above random ones, where a mixture's weight need not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import clean_share  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_null_estimates_find_the_mismatched_share() -> None:
    rng = np.random.default_rng(0)
    n, dim, mismatched = 20_000, 64, 0.07
    image = unit(rng.normal(size=(n, dim)))
    # clean captions near their image with a wide spread of similarity (a long low tail),
    # mismatched ones unrelated to it
    closeness = rng.uniform(0.3, 3.0, size=(n, 1))
    text = unit(closeness * image + rng.normal(size=(n, dim)) / np.sqrt(dim))
    bad = rng.random(n) < mismatched
    text[bad] = unit(rng.normal(size=(int(bad.sum()), dim)))
    similarity = np.einsum("ij,ij->i", image, text)
    by_median, by_ratio = clean_share.mismatched_share(image, text, similarity)
    assert abs(by_median - bad.mean()) < 0.02 and abs(by_ratio - bad.mean()) < 0.02
    # with every caption clean, neither estimate invents a mismatched share
    clean_text = unit(closeness * image + rng.normal(size=(n, dim)) / np.sqrt(dim))
    clean = np.einsum("ij,ij->i", image, clean_text)
    assert max(clean_share.mismatched_share(image, clean_text, clean)) < 0.01


def test_poisons_in_top_counts_by_similarity_rank() -> None:
    import leaks_by_share

    similarity = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5, 0.05])
    is_poison = np.array([False, True, False, False, True, False, False, True, False, False])
    # ranks: 0.9, 0.8, 0.7 (poison), 0.6, 0.5, 0.4 (poison), 0.3, 0.2, 0.1 (poison), 0.05
    assert leaks_by_share.poisons_in_top(similarity, is_poison, (0.2, 0.3, 0.5, 0.6, 0.9, 1.0)) == [0, 1, 1, 2, 3, 3]
