"""Do label-consistent poisons stand out anywhere a split could look?

Label-consistent poisons are target-class images with the trigger and their own, true
captions, so the image-caption similarity that every split ranks by cannot flag them. This
measures, on one embedding folder of a poisoned set, whether the *image* space does: how
similar the poisons' images are to each other (a tight cluster of triggered images) against
clean images of the same class.

    safeclip poison fm/train --out lc --attack label-consistent --target-class trouser --count 50
    safeclip warmup lc --out lc-warmup.pt --unimodal-epochs 1 --clip-epochs 1 --clip-lr-scale 0.1 \\
        --batch-size 512 --lr 1e-3 --warmup-steps 10
    safeclip embed lc --checkpoint lc-warmup.pt --out lc-emb
    python benchmarks/label_consistent.py lc-emb --poisoned lc [--k 10]

Prints, for the poisons against clean pairs of the target class: AUROC of the similarity
(what the split sees), AUROC of image-space density (mean cosine to the k nearest images),
and how many of each poison's k nearest images are poisons (a cluster of triggered images
would put most of them there; chance is the poisons' share of the class).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sanitize.defenses.balance import vectors_to_numpy  # noqa: E402
from sanitize.evaluation.metrics import auroc  # noqa: E402
from sanitize.io.artifacts import Embeddings, find_poison_manifest, read_poison_manifest  # noqa: E402


def load(emb: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    keys, images, similarity = [], [], []
    for path in Embeddings(emb).files():
        table = pq.read_table(path, columns=["key", "image_emb", "similarity"])
        keys += table.column("key").to_pylist()
        images.append(vectors_to_numpy(table.column("image_emb"), path.name))
        similarity.append(table.column("similarity").to_numpy())
    return keys, np.concatenate(images).astype(np.float32), np.concatenate(similarity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("emb", type=Path, help="`safeclip embed` output of the poisoned set")
    parser.add_argument("--poisoned", type=Path, required=True, help="the `safeclip poison` output")
    parser.add_argument("--target-class", default="trouser", help="the poisons' class (as the manifest's true_class)")
    parser.add_argument("--k", type=int, default=10, help="nearest images per pair")
    args = parser.parse_args()
    import faiss

    keys, images, similarity = load(args.emb)
    rows = read_poison_manifest(find_poison_manifest(args.poisoned))
    poison_keys = {r["key"] for r in rows if r.get("attack") == "label-consistent"}
    true_class = {r["key"]: r.get("true_class") for r in rows}
    poison = np.array([k in poison_keys for k in keys])
    clean_target = np.array([true_class.get(k) == args.target_class for k in keys]) & ~poison
    group = poison | clean_target
    centred = images - images.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True) + 1e-12
    index = faiss.IndexFlatIP(centred.shape[1])
    index.add(centred)
    cosines, neighbours = index.search(centred, args.k + 1)  # the first hit is the image itself
    density = cosines[:, 1:].mean(axis=1)
    poison_neighbours = poison[neighbours[:, 1:]].mean(axis=1)
    result = {
        "pairs": len(keys), "poisons": int(poison.sum()), "clean_target_class": int(clean_target.sum()),
        # AUROC of the poisons against clean pairs of their class: low similarity, high density
        "auroc_similarity_low": auroc(poison[group], -similarity[group]),
        "auroc_density_high": auroc(poison[group], density[group]),
        "poison_share_of_class": float(poison.sum() / max(1, (poison | clean_target).sum())),
        "poison_neighbours_of_poisons": float(poison_neighbours[poison].mean()),
        "poison_neighbours_of_clean_target": float(poison_neighbours[clean_target].mean()),
        "k": args.k,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
