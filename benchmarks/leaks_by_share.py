"""How many poison pairs of one attack would a safe share of S admit, at each split of a run?

Ranks every pair of a split epoch's scores by similarity (what the ranking follows, near-duplicate
grouping aside) and counts the attack's poisons among the top S, for several S at once. It reads
a finished pretrain run's per-epoch scores and the poisoned set's manifest (docs/research.md,
question 7):

    python benchmarks/leaks_by_share.py bench/runs/tb@20k/resplit-estimate-e10 bench/poisoned/tb@20k --attack badnet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sanitize.io.artifacts import Run, poison_manifest_path

SHARES = (0.85, 0.88, 0.90, 0.92, 0.93, 0.95)


def poisons_in_top(similarity: np.ndarray, is_poison: np.ndarray, shares: tuple[float, ...]) -> list[int]:
    """Poisons among the top `share` of pairs by similarity, for each share."""
    ranked = is_poison[np.argsort(-similarity, kind="stable")]
    return [int(ranked[:int(share * len(ranked))].sum()) for share in shares]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a pretrain run folder (RUN/scores/epoch=K)")
    parser.add_argument("poisoned", type=Path, help="the poisoned set it trained on (its manifest.parquet)")
    parser.add_argument("--attack", default="badnet", help="which attack's poisons to count (default badnet)")
    args = parser.parse_args()
    truth = pq.read_table(poison_manifest_path(args.poisoned), columns=["key", "kind", "attack"]).to_pylist()
    poison_keys = {r["key"] for r in truth if r["kind"] == "poison" and r["attack"] == args.attack}
    print("| split (epoch) | " + " | ".join(f"top {s:.0%}" for s in SHARES) + " |")
    print("| --- |" + " --- |" * len(SHARES))
    run = Run(args.run)
    for epoch in sorted(int(p.name.split("=")[1]) for p in (args.run / "scores").glob("epoch=*")):
        table = pq.read_table([str(f) for f in run.scores(epoch).files()], columns=["key", "similarity"])
        is_poison = np.array([k in poison_keys for k in table.column("key").to_pylist()])
        counts = poisons_in_top(table.column("similarity").to_numpy(), is_poison, SHARES)
        print(f"| {epoch} | " + " | ".join(map(str, counts)) + " |")


if __name__ == "__main__":
    main()
