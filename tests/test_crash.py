"""kill -9 at random moments (issue 14): a killed `embed` or `split` resumes to the bytes an
uninterrupted run writes, nothing half-written is ever read, and no DataLoader worker
outlives the process that started it. Real processes, real SIGKILLs; seeded delays."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_class_pairs
from emb_synth import mixture_similarities, write_emb
from procs import alive, descendants

ENV = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
SAFECLIP = [sys.executable, "-m", "cli.main"]


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*SAFECLIP, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=600,
                            **kwargs)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([*SAFECLIP, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_for(condition, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_timing(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items()
            if k not in ("seconds", "timing_s", "pairs_per_second_rank0", "emb", "world_size")}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """240 pairs in 10 shards: long enough to kill embed in the middle."""
    out = tmp_path_factory.mktemp("many_shards")
    write_class_pairs(out, 240, samples_per_shard=24, seed=3)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_embed_killed_at_random_moments_resumes_byte_identical(many_shards, tiny_checkpoint, tmp_path):
    args = ["--checkpoint", tiny_checkpoint, "--workers", "1", "--batch-size", "8", "--dtype", "float32"]
    assert _run("embed", many_shards, "--out", tmp_path / "full", *args).returncode == 0
    full = _files(tmp_path / "full")
    rng = random.Random(14)
    out = tmp_path / "killed"
    kills = 0
    for attempt in range(3):
        proc = _start("embed", many_shards, "--out", out, *args)
        # Kill once the run is under way: after it recorded its identity, at a random moment.
        assert _wait_for(lambda: (out / "embed.started.json").exists() or proc.poll() is not None)
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # What a kill leaves is never read as a whole folder.
        if not (out / "embed.json").exists():
            split = _run("split", out, "--out", tmp_path / f"part{attempt}")
            assert split.returncode == 1 and "unfinished embeddings" in split.stderr
        # Never a visible partial file: every visible one is byte-identical to the full run's.
        for name, data in _files(out).items():
            if name.endswith(".parquet") and not name.startswith("."):
                assert data == full[name], name
    assert kills >= 1
    assert _run("embed", many_shards, "--out", out, *args).returncode == 0  # resume
    resumed = _files(out)
    assert {k: v for k, v in resumed.items() if k != "embed.json"} == \
           {k: v for k, v in full.items() if k != "embed.json"}  # no temporary file left either
    assert _without_timing(json.loads(resumed["embed.json"])) == _without_timing(json.loads(full["embed.json"]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_split_killed_at_random_moments_reruns_byte_identical(tmp_path):
    rng_data = np.random.default_rng(5)
    emb = write_emb(tmp_path / "emb", {f"{i:05d}": mixture_similarities(40_000, rng_data) for i in range(6)})
    args = ["--ratio-schedule", "fraction:0.5", "--fit-sample", "20000"]
    assert _run("split", emb, "--out", tmp_path / "full", *args).returncode == 0
    full = _files(tmp_path / "full")
    rng = random.Random(41)
    out = tmp_path / "killed"
    kills = 0
    for attempt in range(3):
        proc = _start("split", emb, "--out", out, *args, "--force")
        assert _wait_for(lambda: (out / "risky").exists() or proc.poll() is not None)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if not (out / "split.json").exists():
            query = _run("query", out, "SELECT count(*) FROM pairs")
            assert query.returncode == 1 and "unfinished split" in query.stderr  # never a partial count
    assert kills >= 1
    assert _run("split", emb, "--out", out, *args, "--force").returncode == 0
    rerun = _files(out)
    assert {k: v for k, v in rerun.items() if k != "split.json"} == \
           {k: v for k, v in full.items() if k != "split.json"}  # stale .tmpPID files removed too
    assert _without_timing(json.loads(rerun["split.json"])) == _without_timing(json.loads(full["split.json"]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dataloader_workers_die_with_a_killed_embed(many_shards, tiny_checkpoint, tmp_path):
    proc = _start("embed", many_shards, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "emb",
                  "--workers", "2", "--batch-size", "4")
    # PyTorch's own watchdog notices a dead parent after up to 5 s; ours at once. The two
    # workers come from a fork server, which comes with a resource tracker: 4 processes.
    assert _workers_gone_after_kill(proc, start_timeout=120.0, processes=4), \
        "DataLoader workers outlived the killed embed"


def _workers_gone_after_kill(proc: subprocess.Popen, start_timeout: float, processes: int) -> bool:
    """Wait until `proc` has `processes` descendants (its DataLoader workers and their helpers),
    kill -9 `proc`: are they all gone within 2 s? (Any left are killed, so a failing test
    leaves no orphans.)"""
    try:
        assert _wait_for(lambda: len(descendants(proc.pid)) >= processes or proc.poll() is not None,
                         timeout=start_timeout)
        time.sleep(0.5)
        workers = descendants(proc.pid)
        assert len(workers) >= processes and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gone = _wait_for(lambda: not any(alive(w) for w in workers), timeout=2.0)
    for w in workers:
        if alive(w):
            os.kill(w, signal.SIGKILL)
    return gone


LOADER_IN_A_THREAD = """
import threading, time, torch
from sanitize.io.loader_workers import exit_with_parent

class Slow(torch.utils.data.IterableDataset):
    def __iter__(self):  # one item, then a long decode: the worker never polls its queue meanwhile
        yield 0
        time.sleep(60)
        yield 1

def run():
    loader = torch.utils.data.DataLoader(Slow(), batch_size=None, num_workers=2,
                                         worker_init_fn=exit_with_parent())
    for _ in loader:
        pass

threading.Thread(target=run).start()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_of_a_loader_in_a_thread_poll_for_their_parent(tmp_path):
    """Off the main thread the kernel's parent-death signal would follow the thread, so the
    workers poll for the parent process instead: still gone right after a kill -9."""
    proc = subprocess.Popen([sys.executable, "-c", LOADER_IN_A_THREAD], env=ENV)
    assert _workers_gone_after_kill(proc, start_timeout=60.0, processes=2), \
        "DataLoader workers outlived their killed parent"


def _file_size_limit(limit: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_write_the_kernel_refuses_is_one_line_and_leaves_nothing_half_written(class_pairs_dir, tiny_checkpoint,
                                                                                  tmp_path):
    """A real failed write (the process's file size limit: EFBIG from the kernel, like a full
    disk mid-file): one line, no temporary or truncated file, and a rerun finishes the job."""
    rng = np.random.default_rng(2)
    emb = write_emb(tmp_path / "emb", {f"{i:05d}": mixture_similarities(3000, rng) for i in range(2)})
    limited = _file_size_limit(30_000)
    commands = {
        "split": ["split", emb, "--out", tmp_path / "part", "-r", "fraction:0.5"],
        "embed": ["embed", class_pairs_dir, "-c", tiny_checkpoint, "-o", tmp_path / "e", "--workers", "0",
                  "--dtype", "float32"],
    }
    for name, args in commands.items():
        result = _run(*args, preexec_fn=limited)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert "file too large" in lines[0] and ".tmp" not in lines[0], lines[0]
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left anywhere
    assert not (tmp_path / "part" / "split.json").exists() and not (tmp_path / "e" / "embed.json").exists()
    assert _run("split", emb, "--out", tmp_path / "part", "-r", "fraction:0.5").returncode == 0
    query = _run("query", tmp_path / "part", "SELECT * FROM pairs", "--out", tmp_path / "q.csv", preexec_fn=limited)
    assert query.returncode == 1 and "q.csv: file too large" in query.stderr
    assert not (tmp_path / "q.csv").exists() and not [p for p in tmp_path.glob(".q.csv*")]
    assert _run(*commands["embed"]).returncode == 0  # resumes after the file that failed
