"""The defense benchmark: every attack × every defense on captioned Fashion-MNIST.

Each cell = poison the 60k train set with one attack (or all at once), pre-train with
one defense, evaluate (zero-shot, linear probe, attack success, detection quality of
the first split). Cells run one at a time and are cached in WORK/results/, so the
table can be built up over several sessions; `--table` writes docs/results.md and the
figure from whatever cells are done. Every step is a `safeclip` command, recorded
verbatim in the cell's JSON so anyone can rerun it.

    python benchmarks/defense.py --work bench --list
    python benchmarks/defense.py --work bench --cell badnet:none --cell badnet:safeclip
    python benchmarks/defense.py --work bench --table

Not run in CI: one cell takes 15-25 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ATTACKS = ("targeted", "badnet", "blended", "wanet", "label-consistent", "all")
DEFENSES = ("none", "safeclip", "safeclip-balanced", "clip-score")
BACKDOOR_TARGET = "trouser"
BACKDOOR_COUNT = 150  # 0.25% of 60k, as in the BadNet setting

# How each attack is injected (poison command options after SRC --out DIR).
ATTACK_OPTIONS = {
    "targeted": ["--attack", "targeted", "--targets", "16", "--copies", "25", "--target-source", "{data}/test"],
    "badnet": ["--attack", "badnet", "--target-class", BACKDOOR_TARGET, "--count", str(BACKDOOR_COUNT)],
    "blended": ["--attack", "blended", "--target-class", BACKDOOR_TARGET, "--count", str(BACKDOOR_COUNT)],
    "wanet": ["--attack", "wanet", "--target-class", BACKDOOR_TARGET, "--count", str(BACKDOOR_COUNT)],
    "label-consistent": ["--attack", "label-consistent", "--target-class", BACKDOOR_TARGET,
                         "--count", str(BACKDOOR_COUNT)],
}
DEFENSE_OPTIONS = {
    "none": ["--defense", "none"],
    "safeclip": ["--defense", "safeclip"],
    "safeclip-balanced": ["--defense", "safeclip", "--ranking", "balanced"],
    "clip-score": ["--defense", "clip-score", "--ratio-schedule", "fraction:0.3"],
}


def safeclip() -> list[str]:
    exe = shutil.which("safeclip")
    return [exe] if exe else [sys.executable, "-m", "cli.main"]


def run(args: list[str], log: list[dict]) -> None:
    """Run one safeclip command, stream its output, record it and its wall time."""
    cmd = safeclip() + args
    shown = "safeclip " + " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    log.append({"command": shown, "seconds": round(time.perf_counter() - start, 1)})


def ensure_data(work: Path, log: list[dict]) -> Path:
    data = work / "fm"
    if not (data / "test" / "sizes.json").exists():
        run(["data", "fashion-mnist", "--out", str(data), "--noise", "0.03", "--seed", "0"], log)
    probe = work / "probe"  # 10k clean train images for the linear probe (keys as in fm/train)
    if not (probe / "train" / "sizes.json").exists():
        run(["data", "fashion-mnist", "--out", str(probe), "--noise", "0", "--seed", "1",
             "--train-size", "10000", "--test-size", "10"], log)
    return data


def ensure_poisoned(work: Path, data: Path, attack: str, log: list[dict]) -> Path:
    out = work / "poisoned" / attack
    if (out / "manifest.parquet").exists():
        return out
    steps = list(ATTACK_OPTIONS) if attack == "all" else [attack]
    src = data / "train"
    for i, step in enumerate(steps):
        target = out if i == len(steps) - 1 else work / "poisoned" / f"{attack}.step{i}"
        options = [o.format(data=data) for o in ATTACK_OPTIONS[step]]
        run(["poison", str(src), "--out", str(target), "--seed", str(i), *options], log)
        src = target
    return out


def newest_checkpoint(run_dir: Path) -> Path:
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch_*.pt"))
    if not checkpoints:
        raise SystemExit(f"{run_dir}: no checkpoint; did pretrain finish?")
    return checkpoints[-1]


def first_split(run_dir: Path) -> Path | None:
    splits = sorted((run_dir / "splits").glob("epoch=*"), key=lambda p: int(p.name.split("=")[1]))
    return splits[0] if splits else None


def run_cell(work: Path, attack: str, defense: str, epochs: int) -> dict:
    log: list[dict] = []
    start = time.perf_counter()
    data = ensure_data(work, log)
    poisoned = ensure_poisoned(work, data, attack, log)
    run_dir = work / "runs" / attack / defense
    train = ["pretrain", str(poisoned), "--out", str(run_dir), "--preset", "cpu", "--epochs", str(epochs),
             "--seed", "0", *DEFENSE_OPTIONS[defense]]
    if (run_dir / "pretrain_stats.json").exists():
        pass  # finished earlier: evaluate again only
    elif run_dir.exists():
        train.append("--resume")
        run(train, log)
    else:
        run(train, log)
    checkpoint = newest_checkpoint(run_dir)
    result_json = run_dir / "eval.json"
    evaluate = ["eval", str(checkpoint), "--test", str(data / "test"), "--classes", "fashion-mnist",
                "--train", str(work / "probe" / "train"), "--poison-dir", str(poisoned), "--json",
                "--out", str(result_json)]
    split = first_split(run_dir)
    if split is not None:
        evaluate += ["--split", str(split)]
    run(evaluate, log)
    cell = {"attack": attack, "defense": defense, "epochs": epochs, "steps": log,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "train_seconds": sum(s["seconds"] for s in log if s["command"].startswith("safeclip pretrain")),
            "eval": json.loads(result_json.read_text()),
            "machine": f"{os.cpu_count()} CPU cores", "load_after": os.getloadavg()}
    out = work / "results" / f"{attack}__{defense}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(portable(json.dumps(cell, indent=2, default=str), work))
    return cell


def portable(text: str, work: Path) -> str:
    """Recorded commands and paths say `bench/...`, not this machine's folder, so the
    cell JSON can be committed and rerun anywhere with `--work bench`."""
    for prefix in sorted({str(work.resolve()), str(work)}, key=len, reverse=True):
        text = text.replace(prefix, "bench")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="working folder (data, runs, cached results)")
    parser.add_argument("--cell", action="append", default=[], help="ATTACK:DEFENSE, repeatable; 'all:*' etc.")
    parser.add_argument("--epochs", type=int, default=4, help="total epochs per run, equal for every defense")
    parser.add_argument("--list", action="store_true", help="list the cells and which are done")
    parser.add_argument("--table", action="store_true", help="write docs/results.md from the cached cells")
    args = parser.parse_args()
    cells = [(a, d) for a in ATTACKS for d in DEFENSES]
    if args.list:
        for attack, defense in cells:
            done = (args.work / "results" / f"{attack}__{defense}.json").exists()
            print(f"{'done' if done else '    '}  {attack}:{defense}")
        return
    for spec in args.cell:
        attack, _, defense = spec.partition(":")
        chosen = [(a, d) for a, d in cells if attack in (a, "*") and defense in (d, "*")]
        if not chosen:
            raise SystemExit(f"unknown cell {spec!r}; attacks {ATTACKS}, defenses {DEFENSES}")
        for a, d in chosen:
            run_cell(args.work, a, d, args.epochs)
    if args.table:
        from results_table import write_results  # beside this script

        write_results(args.work / "results", Path(__file__).resolve().parents[1] / "docs")


if __name__ == "__main__":
    main()
