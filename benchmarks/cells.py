"""The benchmark's grid: attacks, defenses and ablations, how each is made, and the
names of a cell's results file and run folder (shared by defense.py and results_table.py)."""

from __future__ import annotations

from pathlib import Path

ATTACKS = ("targeted", "badnet", "blended", "wanet", "label-consistent", "all")
DEFENSES = ("none", "safeclip", "safeclip-balanced", "clip-score")
# Ablations: run on request, shown in the table only once run.
VARIANTS = ("safeclip-plain", "safeclip-sft", "safeclip-cap95")
BACKDOOR_TARGET = "trouser"
BACKDOOR_COUNT = 150  # 0.25% of 60k, as in the BadNet setting
DEFAULT_EPOCHS = 5  # the table's epochs; other counts are kept apart (cell_name, run folder)

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
    "safeclip-plain": ["--defense", "safeclip", "--clip-views", "plain"],  # safe set as plain CLIP pairs
    "safeclip-sft": ["--defense", "safeclip", "--score-from-training"],  # no separate scoring pass
    # the paper's schedule caps the safe share at 85%; does the risky rest cost accuracy?
    "safeclip-cap95": ["--defense", "safeclip", "--ratio-schedule", "safeclip:step=0.01,cap=0.95"],
}


def cell_name(attack: str, defense: str, epochs: int) -> str:
    """Results file stem: `badnet__safeclip`, or `badnet__safeclip__10_epochs` off the default."""
    return f"{attack}__{defense}" + ("" if epochs == DEFAULT_EPOCHS else f"__{epochs}_epochs")


def run_folder(work: Path, attack: str, defense: str, epochs: int) -> Path:
    return work / "runs" / attack / (defense if epochs == DEFAULT_EPOCHS else f"{defense}-e{epochs}")
