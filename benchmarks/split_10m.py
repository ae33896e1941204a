"""Split time and peak memory for 10 million synthetic pairs.

Writes a synthetic embedding folder (the schema `safeclip embed` writes: key,
caption, url, label, image_emb/text_emb, similarity; captions of CC3M-like length)
once, then runs `safeclip split` on it in a child process and reports its wall
time and peak resident memory (ru_maxrss of the child), with the machine's load.

    python benchmarks/split_10m.py --dir split10m [--pairs 10000000] [--dim 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sanitize.io.artifacts import EmbedManifest, Embeddings, Split

WORDS = ("a an the of in on with at by for from and man woman child dog cat car street city view "
         "photo picture image illustration vector portrait close up old young beautiful red blue green "
         "white black small large house tree river mountain beach sky sunset night people group two three "
         "sitting standing walking running holding wearing playing looking table room kitchen window door "
         "flowers garden field road bridge building church boat train bike horse bird shirt dress hat "
         "shoes bag cup food plate pizza cake coffee book phone computer stage concert team game ball").split()


def write_synthetic(root: Path, pairs: int, per_file: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    root.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, pairs, per_file)):
        n = min(per_file, pairs - start)
        keys = [f"{index:05d}{i:05d}" for i in range(n)]
        # CC3M captions: ~10 words (about 55 characters), a long tail to ~30 words.
        lengths = np.clip(rng.poisson(9, n) + 2, 3, 30)
        picks = words[rng.integers(0, words.size, lengths.sum())]
        cuts = np.cumsum(lengths)[:-1]
        captions = [" ".join(c) for c in np.split(picks, cuts)]
        urls = [f"https://images.example.com/{index:05d}/{rng_i:08x}/{k}.jpg"
                for k, rng_i in zip(keys, rng.integers(0, 2**31, n))]
        clean = rng.random(n) < 0.8
        sims = np.where(clean, rng.normal(0.30, 0.06, n), rng.normal(0.08, 0.05, n)).astype(np.float32)
        columns = {"key": pa.array(keys), "caption": pa.array(captions), "url": pa.array(urls),
                   "label": pa.array(rng.integers(0, 1000, n))}
        if dim:
            for name in ("image_emb", "text_emb"):
                flat = rng.standard_normal(n * dim).astype(np.float16)
                columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)
        columns["similarity"] = pa.array(sims)
        pq.write_table(pa.table(columns), root / f"{index:05d}.parquet")
    Embeddings(root).write_manifest(EmbedManifest(
        checkpoint="synthetic", source="", source_format="synthetic", dtype="float16", dim=dim, count=pairs,
        shards=[f.name for f in Embeddings(root).files()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="Scratch folder (needs ~1.5 GB for 10M pairs at dim 16).")
    ap.add_argument("--pairs", type=int, default=10_000_000)
    ap.add_argument("--per-file", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=16, help="Embedding width stored (never read by split).")
    ap.add_argument("--schedule", default="safeclip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="Keep the generated data and the split.")
    args = ap.parse_args()

    root = Path(args.dir)
    emb, part = root / "emb", root / "part"
    if not Embeddings(emb).is_finished():
        t = time.perf_counter()
        write_synthetic(emb, args.pairs, args.per_file, args.dim, args.seed)
        print(f"generated {args.pairs:,} pairs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    shutil.rmtree(part, ignore_errors=True)

    load_before = os.getloadavg()
    cmd = [sys.executable, "-m", "cli.main", "split", str(emb), "--out", str(part),
           "--ratio-schedule", args.schedule, "--seed", str(args.seed)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    manifest = Split(part).manifest().to_json()
    result = {
        "pairs": manifest["counts"]["total"], "files": len(manifest["input_files"]), "dim": args.dim,
        "wall_s": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
        "stages_s": manifest["timing_s"], "fit_sample": manifest["fit_sample"],
        "safe_share": round(manifest["counts"]["safe_share"], 4),
        "cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "emb_size_gib": round(sum(f.stat().st_size for f in emb.glob("*.parquet")) / 2**30, 2),
        "command": " ".join(cmd[1:]),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(part, ignore_errors=True)


if __name__ == "__main__":
    main()
