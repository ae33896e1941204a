"""The defense benchmark: every attack × every defense on captioned Fashion-MNIST.

Each cell = poison the 60k train set with one attack (or all at once), pre-train with
one defense, evaluate (zero-shot, linear probe, attack success, detection quality of
the first split). Cells run one at a time and are cached in WORK/results/, so the
table can be built up over several sessions; `--table` writes docs/results.md and the
figure from whatever cells are done. Every step is a `safeclip` command, recorded
verbatim in the cell's JSON so anyone can rerun it.

    python benchmarks/defense.py --work bench --list
    python benchmarks/defense.py --work bench --cell badnet:none --cell badnet:safeclip
    python benchmarks/defense.py --work bench --cell 'all:*'      # the grid's defenses for one attack
    python benchmarks/defense.py --work bench --cell all:safeclip-plain   # an ablation, by name
    python benchmarks/defense.py --work bench --cell badnet:safeclip --epochs 10  # a longer run
    python benchmarks/defense.py --work bench --cell 'blended:*' --cell 'wanet:*' --jobs 8  # a big machine
    python benchmarks/defense.py --work bench --table

A cell whose run and eval are already in WORK is rebuilt from them without training
again; each cell's JSON lists every command that makes it, cached or not. The other
warm-up defenses of an attack reuse the safeclip cell's warm-up (`--warmup-from`).

Not run in CI: one cell takes 20-45 minutes on 2 CPU cores, 2-4 minutes on one H200 with 16
cores (`--jobs 3 --pretrain-args "--workers 2"`, see docs/performance.md).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from sanitize.io.pairs import SIZES_FILE
from sanitize.io.artifacts import Run, kinds_by_key, poison_manifest_path, warmup_finished  # noqa: F401

from cells import (ATTACKS, DATASETS, DEFAULT_DATA, DEFAULT_EPOCHS, DEFENSE_OPTIONS, DEFENSES, NOISE_ROW,  # noqa
                   STRONGER, SWEEP, VARIANTS, attack_steps, cell_name, run_folder, split_attack)

def safeclip() -> list[str]:
    exe = shutil.which("safeclip")
    return [exe] if exe else [sys.executable, "-m", "cli.main"]


def run(args: list[str], log: list[dict], cached: bool = False, output: TextIO | None = None) -> None:
    """Run one safeclip command, stream its output (to `output` when given), record it
    and its wall time. With `cached` (its output is already there) it is only recorded,
    so every cell lists the full command sequence that rebuilds it."""
    cmd = safeclip() + args
    shown = "safeclip " + " ".join(shlex.quote(a) for a in args)
    if cached:
        log.append({"command": shown, "seconds": None, "cached": True})
        return
    print(f"\n$ {shown}", file=output or sys.stdout, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=output, stderr=subprocess.STDOUT if output else None)
    log.append({"command": shown, "seconds": round(time.perf_counter() - start, 1)})


def ensure_data(work: Path, log: list[dict], output: TextIO | None = None, variant: str = DEFAULT_DATA) -> Path:
    spec = DATASETS[variant]
    data = work / ("fm" if variant == DEFAULT_DATA else f"fm-{variant}")
    size = ["--train-size", str(spec["train_size"])] if spec["train_size"] else []
    run(["data", "fashion-mnist", "--out", str(data), "--noise", str(spec["noise"]), "--seed", "0", *size], log,
        cached=(data / "test" / SIZES_FILE).exists(), output=output)
    probe = work / "probe"  # 10k clean train images for the linear probe (keys as in fm/train)
    run(["data", "fashion-mnist", "--out", str(probe), "--noise", "0", "--seed", "1",
         "--train-size", "10000", "--test-size", "10"], log, cached=(probe / "train" / SIZES_FILE).exists(),
        output=output)
    return data


def ensure_poisoned(work: Path, data: Path, attack: str, log: list[dict], output: TextIO | None = None) -> Path:
    out = work / "poisoned" / attack
    cached = poison_manifest_path(out).exists()
    steps = attack_steps(attack)
    src = data / "train"
    for i, (_, step_options) in enumerate(steps):
        target = out if i == len(steps) - 1 else work / "poisoned" / f"{attack}.step{i}"
        options = [o.format(data=data) for o in step_options]
        run(["poison", str(src), "--out", str(target), "--seed", str(i), *options], log, cached=cached,
            output=output)
        src = target
    return out


def newest_checkpoint(run_dir: Path) -> Path:
    checkpoint = Run(run_dir).latest_checkpoint()
    if checkpoint is None:
        raise SystemExit(f"{run_dir}: no checkpoint; did pretrain finish?")
    return checkpoint


def first_split(run_dir: Path) -> Path | None:
    epochs = Run(run_dir).split_epochs()
    return Run(run_dir).split(epochs[0]).root if epochs else None


def similarity_histogram(run_dir: Path, poisoned: Path, bins: int = 60) -> dict | None:
    """Image-caption similarity at the first split, binned per kind of pair (clean,
    caption noise, each attack), with the lowest safe similarity: the figure's data,
    kept in the cell JSON so `--table` can draw it without the run folder."""
    import numpy as np
    import pyarrow.parquet as pq

    run = Run(run_dir)
    epochs = run.split_epochs()
    if not epochs:
        return None
    similarity = {}
    for path in run.scores(epochs[0]).files():
        table = pq.ParquetFile(path).read(columns=["key", "similarity"])
        similarity.update(zip(table.column("key").to_pylist(), table.column("similarity").to_numpy()))
    groups: dict[str, list[float]] = {}
    for key, kind in kinds_by_key(poison_manifest_path(poisoned)).items():
        if key in similarity:
            groups.setdefault(kind, []).append(float(similarity[key]))
    safe_keys = run.split(epochs[0]).key_set("safe")
    values = np.array(list(similarity.values()), dtype=np.float64)
    edges = np.linspace(values.min(), values.max(), bins + 1)
    return {"split": f"epoch={epochs[0]}", "edges": [round(float(e), 5) for e in edges],
            "counts": {name: np.histogram(v, edges)[0].tolist() for name, v in sorted(groups.items())},
            "lowest_safe": min((float(similarity[k]) for k in safe_keys), default=None)}


def safe_leaks(run_dir: Path, poisoned: Path) -> list[dict]:
    """Every split of the run: safe-set size and its pairs that are not clean, by kind:
    the poisons each epoch's CLIP loss actually trained on."""
    kinds = kinds_by_key(poison_manifest_path(poisoned))
    run = Run(run_dir)
    out = []
    for epoch in run.split_epochs():
        counts: dict[str, int] = {}
        safe = 0
        for keys in run.split(epoch).keys("safe").values():
            for key in keys:
                safe += 1
                kind = kinds.get(key, "clean")
                if kind != "clean":
                    counts[kind] = counts.get(kind, 0) + 1
        out.append({"split": f"epoch={epoch}", "safe": safe, "not_clean": dict(sorted(counts.items()))})
    return out


def asr_by_epoch(run_dir: Path, data: Path, poisoned: Path, log: list[dict],
                 output: TextIO | None = None) -> dict[str, dict]:
    """Long runs keep every checkpoint; evaluate the attack after each one from epoch 3 on
    (no probe; the first two are the warm-up's), so the cell shows when a backdoor takes,
    or that it never does. The last epoch is the cell's own full eval."""
    by_epoch = {}
    run_folder_ = Run(run_dir)
    for saved in run_folder_.saved_epochs()[:-1]:
        checkpoint, epoch = run_folder_.checkpoint(saved), saved + 1  # epoch_0003.pt = after 4 epochs
        if epoch < 3:  # (a run that adopted a warm-up has no checkpoints of its own before 3)
            continue
        out = run_dir / f"eval_{checkpoint.stem}.json"
        args = ["eval", str(checkpoint), "--test", str(data / "test"), "--classes", "fashion-mnist",
                "--poison-dir", str(poisoned), "--json", "--out", str(out)]
        run(args, log, cached=out.exists() and out.stat().st_mtime > checkpoint.stat().st_mtime, output=output)
        ev = json.loads(out.read_text())
        by_epoch[str(epoch)] = {"zero_shot": ev["zero_shot"]["top1"],
                                "backdoor": {r["attack"]: r["asr"] for r in ev.get("backdoor") or []},
                                "targeted": (ev.get("targeted") or {}).get("success")}
    return by_epoch


def shares_warmup(defense: str) -> bool:
    """Defenses that take their attack's finished safeclip (or resplit) warm-up (`--warmup-from`)
    instead of training their own: every warm-up defense but safeclip itself and the ones
    with warm-up options of their own."""
    own = {"--unimodal-epochs", "--clip-epochs", "--clip-lr-scale"} & set(DEFENSE_OPTIONS[defense])
    return defense not in ("none", "safeclip") and not own


def run_cell(work: Path, attack: str, defense: str, epochs: int, output: TextIO | None = None,
             pretrain_args: tuple[str, ...] = ()) -> dict:
    """Train and evaluate one cell (or rebuild it from its cached run) and write its JSON.
    `output`: where the commands' output goes (a log file when cells run in parallel);
    `pretrain_args`: more pretrain options (`--workers 4`), recorded with the command."""
    log: list[dict] = []
    start = time.perf_counter()
    data = ensure_data(work, log, output, split_attack(attack)[1])
    poisoned = ensure_poisoned(work, data, attack, log, output)
    run_dir = run_folder(work, attack, defense, epochs)
    long_run = epochs != DEFAULT_EPOCHS
    train = ["pretrain", str(poisoned), "--out", str(run_dir), "--preset", "cpu", "--epochs", str(epochs),
             "--seed", "0", *DEFENSE_OPTIONS[defense], *(["--keep", str(epochs)] if long_run else []),
             *pretrain_args]
    # The warm-up depends on the data and the preset only: the other warm-up defenses of
    # an attack take the safeclip cell's (identical) warm-up instead of training it again.
    # the safeclip cell's warm-up, else the resplit cell's: the same settings, so the same file
    finished = [Run(run_folder(work, attack, d, epochs)).warmup for d in ("safeclip", "resplit") if d != defense]
    finished = [w for w in finished if warmup_finished(w)]
    shared = finished[0] if finished else Run(run_folder(work, attack, "safeclip", epochs)).warmup
    shared_warmup = shares_warmup(defense) and bool(finished)
    if shared_warmup:
        train += ["--warmup-from", str(shared)]
    if Run(run_dir).stats.exists():  # finished earlier: evaluate again only
        run(train, log, cached=True, output=output)
    elif run_dir.exists():
        train.append("--resume")
        run(train, log, output=output)
    else:
        run(train, log, output=output)
    checkpoint = newest_checkpoint(run_dir)
    result_json = run_dir / "eval.json"
    evaluate = ["eval", str(checkpoint), "--test", str(data / "test"), "--classes", "fashion-mnist",
                "--train", str(work / "probe" / "train"), "--poison-dir", str(poisoned), "--json",
                "--out", str(result_json)]
    split = first_split(run_dir)
    if split is not None:
        evaluate += ["--split", str(split)]
    if result_json.exists() and result_json.stat().st_mtime > checkpoint.stat().st_mtime:
        # evaluated after its last checkpoint: rebuild the cell from it (`--table` edits, timing fixes)
        run(evaluate, log, cached=True, output=output)
    else:
        run(evaluate, log, output=output)
    by_epoch = asr_by_epoch(run_dir, data, poisoned, log, output) if long_run else None
    # Training time from the run's own per-epoch metrics, so it survives resumes and re-evaluations.
    records = Run(run_dir).read_metrics()
    warmup_seconds = sum(r["seconds"] for r in records if r.get("stage") == "warmup")
    phase3_seconds = sum(r["seconds"]["total"] for r in records if r.get("stage") == "pretrain")
    train_seconds = round(phase3_seconds + (0.0 if shared_warmup else warmup_seconds), 1)
    cell = {"attack": attack, "defense": defense, "epochs": epochs, "steps": log,
            "this_invocation_seconds": round(time.perf_counter() - start, 1),  # 0-ish when rebuilt from cache
            "train_seconds": train_seconds,
            # a shared warm-up's training time is added back, so every row costs the same work
            "warmup_shared_from": str(shared) if shared_warmup else None,
            "train_seconds_with_warmup": round(train_seconds + (warmup_seconds if shared_warmup else 0.0), 1),
            "similarity_histogram": similarity_histogram(run_dir, poisoned),
            "safe_leaks": safe_leaks(run_dir, poisoned),
            "by_epoch": by_epoch,
            "eval": json.loads(result_json.read_text()),
            "machine": machine(), "load_after": os.getloadavg()}
    out = work / "results" / f"{cell_name(attack, defense, epochs)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(portable(json.dumps(cell, indent=2, default=str), work))
    return cell


def machine() -> str:
    """What the cell ran on: its cores, and the GPU the commands used (device auto)."""
    import torch

    cores = f"{os.cpu_count()} CPU cores"
    return f"{cores}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else cores


def warmup_provider(cell: tuple[str, str], batch: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The cell whose warm-up `cell` takes (`--warmup-from`), when it runs in the same
    batch: the safeclip cell of the same attack, for the other warm-up defenses."""
    attack, defense = cell
    provider = (attack, "safeclip")
    return provider if shares_warmup(defense) and provider in batch else None


def run_parallel(work: Path, cells: list[tuple[str, str]], epochs: int, jobs: int,
                 pretrain_args: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Run `cells` `jobs` at a time; each cell's command output goes to WORK/logs/CELL.log.
    The data and each attack's poisoned set are made first (attacks in parallel). A cell
    that shares a warm-up waits until the safeclip cell of its batch has written it, as
    the serial order would have it (the warm-up is then the same file). Returns the cells
    that failed; the others' JSONs are written as they finish."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Each job gets its share of the cores: pretrain and eval read OMP_NUM_THREADS.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    attacks = sorted({a for a, _ in cells})
    with open(logs / "data.log", "a") as output:
        data = {variant: ensure_data(work, [], output, variant) for variant in {split_attack(a)[1] for a in attacks}}

    def poison(attack: str) -> None:
        with open(logs / f"poison_{attack}.log", "a") as output:
            ensure_poisoned(work, data[split_attack(attack)[1]], attack, [], output)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(poison, attacks))  # an attack that cannot be made stops the batch

    # Providers first, so a waiting cell never holds a slot its provider needs.
    ordered = sorted(cells, key=lambda c: warmup_provider(c, cells) is not None)
    failed: list[tuple[str, str]] = []
    done_providers: set[tuple[str, str]] = set()

    def one(cell: tuple[str, str]) -> None:
        attack, defense = cell
        name = cell_name(attack, defense, epochs)
        provider = warmup_provider(cell, cells)
        if provider is not None:
            warmup = Run(run_folder(work, *provider, epochs)).warmup
            while not warmup_finished(warmup) and provider not in done_providers:
                time.sleep(5)
        print(f"started {name}", flush=True)
        start = time.perf_counter()
        try:
            with open(logs / f"{name}.log", "a") as output:
                result = run_cell(work, attack, defense, epochs, output, pretrain_args)
        except Exception as error:  # one broken cell must not stop the others
            failed.append(cell)
            print(f"FAILED  {name}: {error} (see {logs / (name + '.log')})", flush=True)
        else:
            print(f"done    {name} in {time.perf_counter() - start:.0f} s: zero-shot "
                  f"{result['eval']['zero_shot']['top1']:.1%}", flush=True)
        finally:
            done_providers.add(cell)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, ordered))
    return failed


# Every cell once: tb@20k is both a size-sweep and a noise-row attack, and a cell listed
# twice would train two processes into one run folder.
ATTACK_NAMES = tuple(dict.fromkeys(ATTACKS + SWEEP + NOISE_ROW + STRONGER))
ALL_CELLS = [(a, d) for a in ATTACK_NAMES for d in DEFENSES + VARIANTS]


def select_cells(specs: list[str]) -> list[tuple[str, str]]:
    """The cells named by `ATTACK:DEFENSE` specs, each once, in the order first named;
    "*" as the defense means the grid (DEFENSES), an ablation runs only when named."""
    batch: list[tuple[str, str]] = []
    for spec in specs:
        attack, _, defense = spec.partition(":")
        chosen = [(a, d) for a, d in ALL_CELLS if attack in (a, "*") and (defense == d or
                                                                           (defense == "*" and d in DEFENSES))]
        if not chosen:
            raise SystemExit(f"unknown cell {spec!r}; attacks {ATTACK_NAMES}, defenses {DEFENSES + VARIANTS}")
        batch += [c for c in chosen if c not in batch]
    return batch


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
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"total epochs per run, equal for every defense (default {DEFAULT_EPOCHS}; "
                             "other counts get their own run folder and results file, keep every checkpoint "
                             "and record attack success after each epoch)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once (default 1); with more, each cell's output goes to "
                             "WORK/logs/CELL.log and each gets cores/jobs threads: for a many-core or GPU machine")
    parser.add_argument("--pretrain-args", default="",
                        help="more options for every pretrain command, e.g. '--workers 4' on a many-core "
                             "machine (recorded in each cell's commands)")
    parser.add_argument("--list", action="store_true", help="list the cells and which are done")
    parser.add_argument("--table", action="store_true", help="write docs/results.md from the cached cells")
    args = parser.parse_args()
    if args.list:
        for attack, defense in ALL_CELLS:
            done = (args.work / "results" / f"{cell_name(attack, defense, args.epochs)}.json").exists()
            print(f"{'done' if done else '    '}  {attack}:{defense}")
        return
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    extra = tuple(shlex.split(args.pretrain_args))
    batch = select_cells(args.cell)
    if args.jobs > 1 and len(batch) > 1:
        failed = run_parallel(args.work, batch, args.epochs, args.jobs, extra)
        if failed:
            raise SystemExit(f"{len(failed)} cell(s) failed: " + ", ".join(f"{a}:{d}" for a, d in failed))
    else:
        for a, d in batch:
            run_cell(args.work, a, d, args.epochs, pretrain_args=extra)
    if args.table:
        try:
            import matplotlib  # noqa: F401  (the figures)
        except ImportError:
            raise SystemExit("--table draws its figures with matplotlib: pip install -e '.[bench]'") from None
        from results_table import write_results  # beside this script

        write_results(args.work / "results", Path(__file__).resolve().parents[1] / "docs")


if __name__ == "__main__":
    main()
