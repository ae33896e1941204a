"""Faults, measured: kill -9 of `safeclip embed` at random moments, and the query sandbox's cost.

  kill   Embeds a small synthetic source uninterrupted, then `--trials` times starts the same
         embed into another folder, kills it with SIGKILL after a random delay (seeded), records
         how long its DataLoader workers live on, and resumes. Reports the worker lifetimes and
         whether every resumed folder is byte-identical to the uninterrupted one.
         `--baseline` runs the embed with `exit_with_parent` switched off, to show what the
         workers did before it.
  query  Times three queries over a synthetic split of `--pairs` rows through the sandboxed
         connection (`sanitize.stages.query.connect`: Arrow datasets, DuckDB given no path) and
         through DuckDB's own `read_parquet` views (what `connect` did before the sandbox).

    python benchmarks/faults.py kill --dir faults-bench [--trials 8] [--baseline]
    python benchmarks/faults.py query --dir faults-bench [--pairs 2000000]
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sanitize.io.artifacts import Embeddings, Split

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from procs import alive, descendants  # noqa: E402

# The embed command with exit_with_parent switched off (the behaviour before it existed).
BASELINE = """
import sys
import sanitize.stages.embed as embed
embed.exit_with_parent = lambda: None
from cli.main import app
sys.argv = ["safeclip"] + sys.argv[1:]
app()
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != Embeddings.MANIFEST}


def kill(args) -> None:
    import torch

    from conftest import write_class_pairs
    from sanitize.models.checkpoint import save_checkpoint
    from sanitize.models.factory import create_model

    root = Path(args.dir)
    src, checkpoint = root / "src", root / "tiny.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        model, _tokenizer, _size, config = create_model("safeclip-tiny-vit")
        root.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, model, config, training_state={})
        write_class_pairs(src, 480, samples_per_shard=24, seed=3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", BASELINE] if args.baseline else [sys.executable, "-m", "cli.main"]
    embed = ["embed", str(src), "--checkpoint", str(checkpoint), "--workers", "2", "--batch-size", "4",
             "--dtype", "float32"]
    full = root / "full"
    if not (full / Embeddings.MANIFEST).exists():
        subprocess.run([sys.executable, "-m", "cli.main", *embed, "--out", str(full)], env=env, check=True, cwd=ROOT,
                       capture_output=True)
    rng = random.Random(args.seed)
    lifetimes, identical = [], 0
    for trial in range(args.trials):
        out = root / f"killed{trial}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        proc = subprocess.Popen([*command, *embed, "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Two workers from a fork server, plus the server and its resource tracker.
        while len(descendants(proc.pid)) < 4 and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 4.0))
        workers = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while any(alive(w) for w in workers) and time.monotonic() - killed < 30:
            time.sleep(0.01)
        lifetimes.append(time.monotonic() - killed)
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "cli.main", *embed, "--out", str(out)], env=env, check=True, cwd=ROOT,
                       capture_output=True)
        identical += _files(out) == _files(full)
        print(f"trial {trial}: {len(workers)} loader processes, alive {lifetimes[-1]:.2f} s after the kill, "
              f"resumed {'identical' if _files(out) == _files(full) else 'DIFFERENT'}", flush=True)
    print(f"{'baseline (no exit_with_parent)' if args.baseline else 'exit_with_parent'}: workers alive after "
          f"kill -9: max {max(lifetimes):.2f} s, median {float(np.median(lifetimes)):.2f} s, over 1 s in "
          f"{sum(t > 1 for t in lifetimes)} of {len(lifetimes)}; resumed byte-identical {identical}/{len(lifetimes)}; "
          f"load {os.getloadavg()[0]:.1f}")


def query(args) -> None:
    import duckdb

    from emb_synth import mixture_similarities, write_emb
    from sanitize.stages.query import connect
    from sanitize.stages.split import split

    root = Path(args.dir) / f"query{args.pairs}"
    part = root / "part"
    if not (part / Split.MANIFEST).exists():
        rng = np.random.default_rng(0)
        per_file = max(1, args.pairs // 10)
        write_emb(root / "emb", {f"{i:05d}": mixture_similarities(per_file, rng) for i in range(10)})
        split(root / "emb", part, "fraction:0.5")

    def read_parquet_views():
        con = duckdb.connect()
        for name in ("safe", "risky"):
            files = sorted(glob.glob(str(part / name / "*.parquet")))
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({files})")
        con.execute("CREATE VIEW pairs AS SELECT * FROM safe UNION ALL SELECT * FROM risky")
        return con

    queries = ["SELECT partition, count(*), avg(similarity) FROM pairs GROUP BY ALL",
               "SELECT key, caption FROM risky ORDER BY rank DESC LIMIT 5",
               "SELECT count(*) FROM pairs WHERE caption LIKE '%class 3%'"]
    for name, make in (("read_parquet views (before)", read_parquet_views),
                       ("sandbox (connect)", lambda: connect(part))):
        for sql in queries:
            times = []
            for _ in range(3):
                con = make()
                start = time.perf_counter()
                con.sql(sql).fetchall()
                times.append(time.perf_counter() - start)
            print(f"{name:28} best of 3 {min(times):6.3f} s  {sql}")
    print(f"{args.pairs:,} pairs; load {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kill")
    k.add_argument("--dir", required=True)
    k.add_argument("--trials", type=int, default=8)
    k.add_argument("--seed", type=int, default=14)
    k.add_argument("--baseline", action="store_true")
    q = sub.add_parser("query")
    q.add_argument("--dir", required=True)
    q.add_argument("--pairs", type=int, default=2_000_000)
    args = parser.parse_args()
    {"kill": kill, "query": query}[args.what](args)


if __name__ == "__main__":
    main()
