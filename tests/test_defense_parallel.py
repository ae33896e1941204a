"""The defense benchmark's parallel batch (benchmarks/defense.py --jobs): cells that
share a warm-up wait until it is finished, a broken cell does not stop the others, and
each job gets its share of the cores. The cells themselves are replaced by a fake here;
the benchmark's training is not run in CI."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import defense  # noqa: E402


def write_warmup_stats(run_dir: Path, finished: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "warmup.pt").write_bytes(b"checkpoint")
    (run_dir / "warmup_stats.json").write_text(json.dumps({"finished": finished}))


def test_warmup_finished_reads_the_stats_not_the_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "warmup.pt"
    assert not defense.warmup_finished(checkpoint)
    checkpoint.write_bytes(b"written after every epoch")
    assert not defense.warmup_finished(checkpoint)
    write_warmup_stats(tmp_path, finished=False)
    assert not defense.warmup_finished(checkpoint)
    write_warmup_stats(tmp_path, finished=True)
    assert defense.warmup_finished(checkpoint)


def test_only_other_warmup_defenses_wait_and_only_for_their_own_attack() -> None:
    batch = [("badnet", "none"), ("badnet", "safeclip"), ("badnet", "clip-score"), ("wanet", "clip-score")]
    assert defense.warmup_provider(("badnet", "clip-score"), batch) == ("badnet", "safeclip")
    assert defense.warmup_provider(("badnet", "none"), batch) is None
    assert defense.warmup_provider(("badnet", "safeclip"), batch) is None
    # wanet's safeclip cell is not in the batch: train its own warm-up (or take a finished one)
    assert defense.warmup_provider(("wanet", "clip-score"), batch) is None


@pytest.fixture
def fake_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """run_cell replaced: a safeclip cell finishes its warm-up after a short delay; every
    cell records when it started, and wanet:none raises."""
    record: dict = {"started": {}, "warmup_done": {}, "threads": set()}
    lock = threading.Lock()
    monkeypatch.setattr(defense, "ensure_data", lambda work, log, output=None, variant="60k": work / "fm")
    monkeypatch.setattr(defense, "ensure_poisoned",
                        lambda work, data, attack, log, output=None: work / "poisoned" / attack)

    def fake_run_cell(work: Path, attack: str, defense_name: str, epochs: int, output=None,
                      pretrain_args=()) -> dict:
        with lock:
            record["started"][(attack, defense_name)] = time.monotonic()
            record["threads"].add(defense.os.environ["OMP_NUM_THREADS"])
        print("training", attack, defense_name, file=output)
        if (attack, defense_name) == ("wanet", "none"):
            raise RuntimeError("broken cell")
        if defense_name == "safeclip":
            run_dir = defense.run_folder(work, attack, defense_name, epochs)
            write_warmup_stats(run_dir, finished=False)  # mid-warm-up checkpoint
            time.sleep(0.3)
            record["warmup_done"][attack] = time.monotonic()  # before a waiting cell can see it
            write_warmup_stats(run_dir, finished=True)
        return {"eval": {"zero_shot": {"top1": 0.5}}}

    monkeypatch.setattr(defense, "run_cell", fake_run_cell)
    real_sleep, polls = time.sleep, []

    def short_sleep(seconds: float) -> None:
        # A cell left waiting forever must fail the test, not hang it (and CI with it).
        polls.append(seconds)
        if len(polls) > 1000:
            raise RuntimeError("a cell is still waiting for a warm-up after 1000 polls")
        real_sleep(min(seconds, 0.02))

    monkeypatch.setattr(defense.time, "sleep", short_sleep)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return record


def test_parallel_batch_waits_for_the_shared_warmup_and_survives_a_broken_cell(
        tmp_path: Path, fake_cells: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defense.os, "cpu_count", lambda: 16)
    batch = [("badnet", "clip-score"), ("badnet", "safeclip-balanced"), ("badnet", "safeclip"),
             ("wanet", "none"), ("badnet", "none")]
    failed = defense.run_parallel(tmp_path, batch, epochs=5, jobs=4)

    assert failed == [("wanet", "none")]
    assert set(fake_cells["started"]) == set(batch)
    for waiting in (("badnet", "clip-score"), ("badnet", "safeclip-balanced")):
        assert fake_cells["started"][waiting] >= fake_cells["warmup_done"]["badnet"]
    assert fake_cells["threads"] == {"4"}  # 16 cores / 4 jobs
    log = (tmp_path / "logs" / "badnet__clip-score.log").read_text()
    assert "training badnet clip-score" in log


def test_a_failed_provider_releases_its_waiting_cells(tmp_path: Path, fake_cells: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = defense.run_cell

    def provider_breaks(work, attack, defense_name, epochs, output=None, pretrain_args=()):
        if defense_name == "safeclip":
            raise RuntimeError("warm-up crashed")
        return real(work, attack, defense_name, epochs, output)

    monkeypatch.setattr(defense, "run_cell", provider_breaks)
    batch = [("badnet", "safeclip"), ("badnet", "clip-score")]
    failed = defense.run_parallel(tmp_path, batch, epochs=5, jobs=1)  # one slot: no deadlock either
    assert failed == [("badnet", "safeclip")]
    assert ("badnet", "clip-score") in fake_cells["started"]


def test_each_named_cell_is_run_once() -> None:
    # tb@20k is in both the size sweep and the noise row: listed twice, two processes
    # trained into one run folder.
    assert defense.select_cells(["tb@20k:resplit-separate"]) == [("tb@20k", "resplit-separate")]
    batch = defense.select_cells(["tb@20k:*", "tb@20k:none", "badnet:resplit-95"])
    assert len(batch) == len(set(batch)) == len(defense.DEFENSES) + 1
    assert batch[-1] == ("badnet", "resplit-95")
    with pytest.raises(SystemExit, match="unknown cell"):
        defense.select_cells(["badnet:no-such-defense"])
