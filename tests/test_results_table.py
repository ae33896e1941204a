"""The benchmark's table logic (benchmarks/results_table.py) on hand-built cells: the
issue's targets are called met or MISSED from the numbers, and longer runs get their
own rows. No training here; the benchmark itself is not run in CI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from defense import cell_name, run_folder  # noqa: E402
from results_table import attack_did_not_take, long_runs, target_checks, train_time, why_not_run  # noqa: E402


def make_cell(attack: str, defense: str, epochs: int, top1: float, asr: float, no_trigger: float = 0.002,
              targeted: int | None = None, by_epoch: dict | None = None) -> dict:
    ev = {"zero_shot": {"top1": top1}, "linear_probe": {"accuracy": top1},
          "backdoor": [{"attack": "badnet", "asr": asr, "no_trigger": no_trigger}]}
    if targeted is not None:
        ev["targeted"] = {"success": targeted, "total": 16}
    return {"attack": attack, "defense": defense, "epochs": epochs, "eval": ev, "train_seconds": 600.0,
            "by_epoch": by_epoch}


def test_cell_names_keep_other_epoch_counts_apart(tmp_path: Path) -> None:
    assert cell_name("badnet", "safeclip", 5) == "badnet__safeclip"
    assert cell_name("badnet", "safeclip", 10) == "badnet__safeclip__10_epochs"
    assert run_folder(tmp_path, "badnet", "none", 5) == tmp_path / "runs" / "badnet" / "none"
    assert run_folder(tmp_path, "badnet", "none", 10) == tmp_path / "runs" / "badnet" / "none-e10"


def test_targets_met_and_missed_follow_the_numbers() -> None:
    cells = {("all", "none"): make_cell("all", "none", 5, 0.874, asr=0.62, targeted=14),
             ("all", "safeclip"): make_cell("all", "safeclip", 5, 0.760, asr=0.011, targeted=0)}
    lines = "\n".join(target_checks(cells))
    assert "targeted 14/16 flipped, needs >= 12: met" in lines
    assert "BadNet ASR 62.0%, needs >= 80%: MISSED" in lines
    assert "targeted 0/16, needs 0: met" in lines
    # 1.1% against 0.2% without the trigger is 0.9 points: within 1 point
    assert "(+0.9 pt), needs within 1 pt: met" in lines
    assert "zero-shot -11.4 pt vs none at 5 epochs, needs >= -1 pt: MISSED" in lines

    cells[("all", "safeclip")] = make_cell("all", "safeclip", 5, 0.870, asr=0.05, targeted=1)
    lines = "\n".join(target_checks(cells))
    assert "targeted 1/16, needs 0: MISSED" in lines
    assert "(+4.8 pt), needs within 1 pt: MISSED" in lines
    assert "zero-shot -0.4 pt vs none at 5 epochs, needs >= -1 pt: met" in lines

    # the checks use the unrounded gap: 1.04 points shows as +1.0 but is over the limit
    cells[("all", "safeclip")] = make_cell("all", "safeclip", 5, 0.870, asr=0.0124, targeted=0)
    assert "(+1.0 pt), needs within 1 pt: MISSED" in "\n".join(target_checks(cells))
    # a hair under the no-trigger rate prints as +0.0, not -0.0
    cells[("all", "safeclip")] = make_cell("all", "safeclip", 5, 0.870, asr=0.0019, targeted=0)
    assert "(+0.0 pt), needs within 1 pt: met" in "\n".join(target_checks(cells))


def test_a_backdoor_that_did_not_take_is_said_to_show_nothing() -> None:
    cells = {("badnet", "none"): make_cell("badnet", "none", 5, 0.879, asr=0.018),
             ("badnet", "safeclip"): make_cell("badnet", "safeclip", 5, 0.80, asr=0.002)}
    assert "this shows nothing" in "\n".join(target_checks(cells))


def test_longer_runs_get_their_own_rows_and_per_epoch_success(tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (docs / "results").mkdir(parents=True)
    by_epoch = {"4": {"zero_shot": 0.85, "backdoor": {"badnet": 0.267}, "targeted": None}}
    for defense, asr in (("none", 0.965), ("safeclip", 0.001)):
        cell = make_cell("badnet", defense, 10, 0.88, asr=asr, by_epoch=by_epoch)
        (results / f"{cell_name('badnet', defense, 10)}.json").write_text(json.dumps(cell))
    (results / "badnet__none.json").write_text(json.dumps(make_cell("badnet", "none", 5, 0.879, asr=0.018)))

    cells, lines = long_runs(results, docs)
    text = "\n".join(lines)
    assert set(cells) == {10} and set(cells[10]) == {("badnet", "none"), ("badnet", "safeclip")}
    assert "| badnet | none | 10 | 88.0% |" in text
    assert "| badnet / none | 4 | 85.0% | badnet 26.7% |" in text
    assert "| badnet / safeclip | 10 | 88.0% | badnet 0.1% |" in text
    assert "**badnet / none (10 epochs)**: BadNet ASR 96.5%, needs >= 80%: met" in text
    assert "badnet__none__10_epochs.json" in text
    assert (docs / "results" / "badnet__safeclip__10_epochs.json").exists()
    assert not (docs / "results" / "badnet__none.json").exists()  # the 5-epoch cell is the main table's


def test_no_longer_runs_no_section(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    assert long_runs(tmp_path / "results", tmp_path / "docs") == ({}, [])



def test_gpu_cells_name_their_gpu_in_the_train_time() -> None:
    cpu = make_cell("wanet", "none", 5, 0.879, asr=0.003)
    cpu["machine"] = "2 CPU cores"
    gpu = dict(cpu, machine="16 CPU cores, NVIDIA H200", train_seconds=103.5)
    assert train_time(cpu) == "10 min"
    assert train_time(gpu) == "2 min on an H200"


def test_defenses_of_an_attack_that_did_not_take_are_marked_not_needed() -> None:
    assert attack_did_not_take(make_cell("wanet", "none", 5, 0.879, asr=0.003, no_trigger=0.001))
    assert not attack_did_not_take(make_cell("blended", "none", 5, 0.879, asr=0.653))
    assert not attack_did_not_take(None)  # nothing known yet: just "not run"
    # targeted poisoning is judged by its own count, never called "did not take" here
    assert not attack_did_not_take(make_cell("all", "none", 5, 0.87, asr=0.003, targeted=14))


def test_data_variants_get_the_size_section_not_the_longer_runs(tmp_path: Path) -> None:
    from results_table import sweep_lines, variant_cells

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (docs / "results").mkdir(parents=True)
    sweep = make_cell("tb@20k", "resplit", 10, 0.842, asr=0.005, targeted=0)
    sweep["safe_leaks"] = [{"split": "epoch=2", "safe": 17425, "not_clean": {"badnet": 67, "noise": 438}},
                           {"split": "epoch=9", "safe": 17425, "not_clean": {"noise": 28}}]
    (results / "tb@20k__resplit__10_epochs.json").write_text(json.dumps(sweep))
    (results / "badnet__none__10_epochs.json").write_text(json.dumps(make_cell("badnet", "none", 10, 0.887, 0.965)))
    by_epochs, _ = long_runs(results, docs)
    assert list(by_epochs[10]) == [("badnet", "none")]  # the tb@20k cell is not a longer run of an attack
    cells = variant_cells(results, docs)
    assert list(cells) == [("tb@20k", "resplit", 10)]
    assert (docs / "results" / "tb@20k__resplit__10_epochs.json").exists()
    row = [line for line in sweep_lines(cells) if line.startswith("| 20k |")]
    assert row == ["| 20k | resplit | 10 | 84.2% | TDPA 0/16; badnet 0.5% (0.2%) | 17,425 (67 badnet) → 17,425 "
                   "(no poison) | 10 min | [json](results/tb@20k__resplit__10_epochs.json) |"]


def test_another_attack_at_a_sweep_size_is_named_in_its_row(tmp_path: Path) -> None:
    from results_table import sweep_lines, variant_cells

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (docs / "results").mkdir(parents=True)
    for attack, asr in (("tb@20k", 0.86), ("wanet-s4@20k", 0.636)):
        (results / f"{attack}__none__10_epochs.json").write_text(
            json.dumps(make_cell(attack, "none", 10, 0.842, asr=asr)))
    lines = sweep_lines(variant_cells(results, docs))
    rows = [line.split(" | ")[0:2] for line in lines if line.startswith("| 20k")]
    assert rows == [["| 20k", "none"], ["| 20k, wanet-s4", "none"]]  # the sweep's attack first


def test_an_empty_grid_row_says_why() -> None:
    took = {("targeted", "none"): make_cell("all", "none", 5, 0.88, asr=0.003, targeted=16)}
    longer = {10: {("targeted", "resplit"): {}, ("badnet", "none"): {}}}
    assert why_not_run("targeted", "resplit", took, longer) == " at these epochs (measured at more: see Longer runs)"
    assert why_not_run("targeted", "clip-score", took, longer) == ""  # simply not run yet
    quiet = {("badnet", "none"): make_cell("badnet", "none", 5, 0.88, asr=0.004, no_trigger=0.003)}
    assert why_not_run("badnet", "safeclip", quiet, longer) == (
        " (the attack did not take without defense; see Longer runs)")
