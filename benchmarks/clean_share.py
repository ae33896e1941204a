"""How many pairs are mismatched? Estimated from the pairs themselves, against the truth.

An experiment for the safe share (docs/research.md, question 6): the two-component mixture's
clean weight puts 82-86% of the 60k benchmark's pairs in the clean component where 96.75% are
clean, because clean pairs of confusable classes form a long low tail. A mismatched pair's
similarity looks like that of an image with a random caption, which the pairs themselves
give: shuffle the captions against the images and score again (the null). Two estimates of
the mismatched share from it, both assuming clean pairs rarely score below the null's bulk:

- twice the share of pairs below the null's median;
- the smallest ratio data-CDF / null-CDF over the null's 5th-75th percentiles (the largest
  weight a null component can have without exceeding the data anywhere there).

Reads a pretrain run's per-epoch scores (embeddings kept) and the poisoned set's ground truth:

    python benchmarks/clean_share.py bench/runs/badnet/resplit-95-e10 bench/poisoned/badnet --epoch 2 5 9
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sanitize.defenses.mismatch import mismatched_share as estimate_mismatched_share
from sanitize.io.artifacts import Run, poison_manifest_path


def read_epoch(run: Path, epoch: int, bad_keys: set[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image and text embeddings, similarity and a bad-pair mask of one epoch's scores."""
    files = [str(f) for f in Run(run).scores(epoch).files()]
    table = pq.read_table(files, columns=["key", "image_emb", "text_emb", "similarity"])

    def matrix(column: str) -> np.ndarray:
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return np.asarray(flat, np.float32).reshape(table.num_rows, -1)

    bad = np.array([key in bad_keys for key in table.column("key").to_pylist()])
    return matrix("image_emb"), matrix("text_emb"), table.column("similarity").to_numpy(), bad


def mismatched_share(image: np.ndarray, text: np.ndarray, similarity: np.ndarray,
                     seed: int = 0) -> tuple[float, float]:
    """(twice the share below the null's median, the smallest data/null CDF ratio)."""
    shuffled = text[np.random.default_rng(seed).permutation(len(text))]
    null = np.einsum("ij,ij->i", image, shuffled)
    by_median = 2 * float(np.mean(similarity < np.median(null)))
    # the CDF ratio is the one the `estimate` schedule uses: the library's, same seed, same shuffle
    return by_median, estimate_mismatched_share(image, text, similarity, seed=seed).share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a pretrain run folder (RUN/scores/epoch=K)")
    parser.add_argument("poisoned", type=Path, help="the poisoned set it trained on (its manifest.parquet)")
    parser.add_argument("--epoch", type=int, nargs="+", required=True, help="split epochs to read")
    args = parser.parse_args()
    truth = pq.read_table(poison_manifest_path(args.poisoned), columns=["key", "kind"])
    bad_keys = {row["key"] for row in truth.to_pylist() if row["kind"] != "clean"}
    print("| split (epoch) | mismatched share (truth) | 2 × below the null's median | data/null CDF ratio |")
    print("| --- | --- | --- | --- |")
    for epoch in args.epoch:
        image, text, similarity, bad = read_epoch(args.run, epoch, bad_keys)
        by_median, by_ratio = mismatched_share(image, text, similarity)
        print(f"| {epoch} | {bad.mean():.1%} | {by_median:.1%} | {by_ratio:.1%} |")


if __name__ == "__main__":
    main()
