"""How well the first split separates the demo's poisons after a given warm-up.

Runs what `safeclip demo` runs after poisoning — warm-up, embed, split — on an already
poisoned set (by default the one `safeclip demo --out DEMO` wrote to DEMO/data/poisoned),
with the warm-up settings given, and prints one JSON line: AUROC of p_clean (poisons vs
clean), the largest poison-free safe share (per attack and overall), the share with
p_clean >= 0.9 (the paper's first-split rule) and the mixture's separation. This is how
the demo's warm-up was chosen (docs/pipeline.md, "safeclip demo").

    python benchmarks/demo_warmup.py DEMO/data/poisoned --out dw/F --unimodal-epochs 0 \
        --clip-epochs 3 --clip-lr-scale 0.5 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sanitize.io.artifacts import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("poisoned", help="a `safeclip poison` output (with manifest.parquet)")
    parser.add_argument("--out", required=True, help="folder for the checkpoint, embeddings and split")
    parser.add_argument("--unimodal-epochs", type=int, default=0)
    parser.add_argument("--clip-epochs", type=int, default=3)
    parser.add_argument("--clip-lr-scale", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", help="also append the JSON line to this file")
    args = parser.parse_args()

    from sanitize.evaluation.evaluate import split_detection
    from sanitize.stages.config import EmbedConfig, WarmupConfig
    from sanitize.stages.embed import run_embed
    from sanitize.stages.split import split
    from sanitize.stages.warmup import run_warmup

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config = WarmupConfig(unimodal_epochs=args.unimodal_epochs, clip_epochs=args.clip_epochs,
                          clip_lr_scale=args.clip_lr_scale, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, num_workers=1)
    run_warmup(args.poisoned, out / Run.WARMUP, config, threads=args.threads)
    warmup_s = time.perf_counter() - start
    run_embed(args.poisoned, out / Run.WARMUP, out / "emb", EmbedConfig(workers=1))
    result = split(out / "emb", out / "part", "fraction:0.3", force=True)
    detection = split_detection(out / "part")
    p_clean = np.concatenate([pq.read_table(f, columns=["p_clean"]).column(0).to_numpy()
                              for f in sorted((out / "part").glob("*/*.parquet"))])
    line = {"unimodal_epochs": args.unimodal_epochs, "clip_epochs": args.clip_epochs,
            "clip_lr_scale": args.clip_lr_scale, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "warmup_s": round(warmup_s), "auroc": round(detection["auroc"], 3),
            "poison_free_share": {r["name"]: round(r["poison_free_share"], 3) for r in detection["rows"]},
            "p_clean_0.9_share": round(float(np.mean(p_clean >= 0.9)), 3),
            "separation": {k: round(float(v), 3) for k, v in result.manifest.separation.items()}}
    print(json.dumps(line), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
