"""Seconds per post-warm-up epoch of `safeclip pretrain`, three ways, in one run:

  none      --defense none: cross-augmented CLIP on every pair (the baseline)
  separate  --defense safeclip, scoring with the separate no-grad pass (the default)
  training  --defense safeclip --score-from-training (scores kept from the training pass)

Phase-3 epoch cost does not depend on what the weights have learnt, so the
safeclip runs start from a finished warm-up checkpoint of the untrained model
(written here) instead of spending an hour warming up. Scoring and splitting run
over the full data; training runs `--steps` steps and is extrapolated linearly to
the epoch's planned steps (a full epoch of each is ~12 min on 2 busy cores).
For `training`, the measured epoch is the second split epoch (the first has no
training-pass embeddings yet and scores with the separate pass).

    python benchmarks/pretrain_epoch_times.py DATA/train --out bench [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch


def fake_warmup(run: Path, config) -> None:
    """A finished warm-up checkpoint of the seeded, untrained model (timing only)."""
    from sanitize.io.artifacts import Run, side_paths
    from sanitize.train.state import Progress, TrainState

    w = config.warmup
    state = TrainState.create(w.model, None, lr=w.lr, weight_decay=w.weight_decay, memory_bank=w.memory_bank,
                              seed=w.seed, device=torch.device("cpu"))
    run.mkdir(parents=True, exist_ok=True)
    state.save(Run(run).warmup, Progress("warmup", w.to_dict(), {"finished": True}, "", {}))
    side_paths(Run(run).warmup)[0].write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per epoch")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from sanitize.stages.config import PRESETS, PretrainConfig, WarmupConfig
    from sanitize.stages.pretrain import run_pretrain

    preset = PRESETS["cpu"]
    wcfg = WarmupConfig(model=preset["model"], unimodal_epochs=1, clip_epochs=1, batch_size=args.batch_size,
                        lr=preset["lr"], clip_lr_scale=preset["clip_lr_scale"], warmup_steps=preset["warmup_steps"],
                        memory_bank=preset["memory_bank"], num_workers=args.workers)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    results = {}
    load = {"start": os.getloadavg()}
    for name, defense, sft, measured_epoch in (("none", "none", False, 0), ("separate", "safeclip", False, 2),
                                               ("training", "safeclip", True, 3)):
        # epochs=5: the measured epoch is never the last, so it pays for keeping embeddings too
        config = PretrainConfig(warmup=wcfg, epochs=5, defense=defense, score_from_training=sft)
        run = out / name
        if defense != "none":
            fake_warmup(run, config)
        t = time.perf_counter()
        result = run_pretrain(args.src, run, config, threads=args.threads, stop_after_epoch=measured_epoch,
                              max_steps_per_epoch=args.steps)
        record = [r for r in result.epochs if r.get("epoch") == measured_epoch][-1]
        sec = record["seconds"]
        per_step = sec["train"] / max(1, record["steps"])
        epoch_s = per_step * record["planned_steps"] + sec.get("score", 0.0) + sec.get("split", 0.0)
        results[name] = {"epoch": measured_epoch, "steps_timed": record["steps"],
                         "planned_steps": record["planned_steps"], "train_s_per_step": round(per_step, 3),
                         "score_s": sec.get("score", 0.0), "split_s": sec.get("split", 0.0),
                         "train_s_extrapolated": round(per_step * record["planned_steps"], 1),
                         "epoch_s": round(epoch_s, 1), "safe_ratio": record.get("safe_ratio"),
                         "wall_s_this_mode": round(time.perf_counter() - t, 1), "load_after": os.getloadavg()}
        print(name, json.dumps(results[name]), flush=True)
    load["end"] = os.getloadavg()
    summary = {"src": args.src, "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
               "load_average": load, "modes": results}
    (out / "epoch_times.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
