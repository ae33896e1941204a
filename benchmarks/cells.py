"""The benchmark's grid: attacks, defenses and ablations, how each is made, and the
names of a cell's results file and run folder (shared by defense.py and results_table.py)."""

from __future__ import annotations

from pathlib import Path

ATTACKS = ("targeted", "badnet", "blended", "wanet", "label-consistent", "all")
DEFENSES = ("none", "resplit", "safeclip", "safeclip-balanced", "clip-score")
# Ablations: run on request, shown in the table only once run. The "warm-all" ... "resplit-cross" rows
# decompose the accuracy cost (docs/results.md, "Where the accuracy goes"): each changes one thing.
VARIANTS = ("safeclip-plain", "safeclip-sft", "safeclip-cap95", "warm-all", "fixed85", "resplit-nodedup",
            "resplit-unimodal", "resplit-cross", "resplit-95", "resplit-separate", "resplit-clipwarm",
            "resplit-clip1", "resplit-estimate", "resplit-estimate-m5")
BACKDOOR_TARGET = "trouser"
BACKDOOR_COUNT = 150  # 0.25% of 60k, as in the BadNet setting
DEFAULT_EPOCHS = 5  # the table's epochs; other counts are kept apart (cell_name, run folder)

# The data a cell trains on: the benchmark's 60,000 pairs with 3% caption noise, or the variant an
# attack names after "@" (the size sweep and the web-like noise row).
DEFAULT_DATA = "60k"
DATASETS = {
    "60k": {"train_size": None, "noise": 0.03},
    "20k": {"train_size": 20000, "noise": 0.03},
    "5k": {"train_size": 5000, "noise": 0.03},
    "20k-noise20": {"train_size": 20000, "noise": 0.2},
}
# "tb": targeted poisoning and BadNet in one dataset, the size sweep's attacks: (targets x 25 copies,
# BadNet pairs) per data size, BadNet at about 0.5% of the pairs.
TB_COUNTS = {"5k": (4, 25), "20k": (16, 100), "60k": (16, 300), "20k-noise20": (16, 100)}
SWEEP = ("tb@5k", "tb@20k", "tb@60k")
NOISE_ROW = ("tb@20k", "tb@20k-noise20")
# WaNet at its default strength (0.5 px of warp) does not take on 28-px images at 5 or 10 epochs;
# a stronger warp with more pairs, at 20k pairs (docs/results.md, "Dataset size and caption noise").
STRONGER = ("wanet-s4@20k",)

# How each attack is injected (poison command options after SRC --out DIR).
ATTACK_OPTIONS = {
    "targeted": ["--attack", "targeted", "--targets", "16", "--copies", "25", "--target-source", "{data}/test"],
    "badnet": ["--attack", "badnet", "--target-class", BACKDOOR_TARGET, "--count", str(BACKDOOR_COUNT)],
    "blended": ["--attack", "blended", "--target-class", BACKDOOR_TARGET, "--count", str(BACKDOOR_COUNT)],
    "wanet": ["--attack", "wanet", "--target-class", BACKDOOR_TARGET, "--count", str(BACKDOOR_COUNT)],
    "wanet-s4": ["--attack", "wanet", "--target-class", BACKDOOR_TARGET, "--count", "200", "--strength", "4"],
    "label-consistent": ["--attack", "label-consistent", "--target-class", BACKDOOR_TARGET,
                         "--count", str(BACKDOOR_COUNT)],
}
DEFENSE_OPTIONS = {
    "none": ["--defense", "none"],
    "resplit": ["--defense", "resplit"],  # the default
    "safeclip": ["--defense", "safeclip"],  # the paper's loop
    "safeclip-balanced": ["--defense", "safeclip", "--ranking", "balanced"],
    "clip-score": ["--defense", "clip-score", "--ratio-schedule", "fraction:0.3"],
    "safeclip-plain": ["--defense", "safeclip", "--clip-views", "plain"],  # safe set as plain CLIP pairs
    "safeclip-sft": ["--defense", "safeclip", "--score-from-training"],  # no separate scoring pass
    # the paper's schedule caps the safe share at 85%; does the risky rest cost accuracy?
    "safeclip-cap95": ["--defense", "safeclip", "--ratio-schedule", "safeclip:step=0.01,cap=0.95"],
    # the decomposition: warm-up then plain CLIP on every pair; on a fixed first 85%; re-split to 85% every
    # epoch without near-duplicate grouping; + the unimodal loss on the risky rest; + cross views
    "warm-all": ["--defense", "clip-score", "--ratio-schedule", "fraction:1.0"],
    "fixed85": ["--defense", "clip-score", "--ratio-schedule", "fraction:0.85"],
    "resplit-nodedup": ["--defense", "resplit", "--dedup-tau", "0"],
    "resplit-unimodal": ["--defense", "resplit", "--dedup-tau", "0", "--risky-loss", "unimodal"],
    "resplit-cross": ["--defense", "resplit", "--dedup-tau", "0", "--risky-loss", "unimodal", "--clip-views", "cross"],
    "resplit-95": ["--defense", "resplit", "--ratio-schedule", "fraction:0.95"],
    "resplit-separate": ["--defense", "resplit", "--score-separately"],  # score-from-training's check
    # the safe share from the data: 1 - the estimated mismatched share - 1%, within [30%, 95%]
    "resplit-estimate": ["--defense", "resplit", "--ratio-schedule", "estimate"],
    "resplit-estimate-m5": ["--defense", "resplit", "--ratio-schedule", "estimate:margin=0.05"],  # a wider margin
    # a cheaper warm-up: two plain CLIP epochs at 0.1 x lr, no unimodal epoch (its own warm-up, not shared)
    "resplit-clipwarm": ["--defense", "resplit", "--unimodal-epochs", "0", "--clip-epochs", "2"],
    # the shortest warm-up: one plain CLIP epoch at the full lr on every pair, then re-split from epoch 2
    "resplit-clip1": ["--defense", "resplit", "--unimodal-epochs", "0", "--clip-epochs", "1", "--clip-lr-scale", "1.0"],
}


def split_attack(attack: str) -> tuple[str, str]:
    """("tb", "20k") for "tb@20k"; an attack without "@" trains on the default data."""
    base, _, data = attack.partition("@")
    data = data or DEFAULT_DATA
    if data not in DATASETS:
        raise ValueError(f"unknown data {data!r} in {attack!r}; choose one of {', '.join(DATASETS)}")
    return base, data


def attack_steps(attack: str) -> list[tuple[str, list[str]]]:
    """The poison runs that make an attack's dataset: (step name, poison options), in order."""
    base, data = split_attack(attack)
    if base == "tb":
        targets, badnet = TB_COUNTS[data]
        return [("targeted", ["--attack", "targeted", "--targets", str(targets), "--copies", "25",
                              "--target-source", "{data}/test"]),
                ("badnet", ["--attack", "badnet", "--target-class", BACKDOOR_TARGET, "--count", str(badnet)])]
    steps = list(ATTACK_OPTIONS) if base == "all" else [base]
    return [(step, ATTACK_OPTIONS[step]) for step in steps]


def cell_name(attack: str, defense: str, epochs: int) -> str:
    """Results file stem: `badnet__safeclip`, or `badnet__safeclip__10_epochs` off the default."""
    return f"{attack}__{defense}" + ("" if epochs == DEFAULT_EPOCHS else f"__{epochs}_epochs")


def run_folder(work: Path, attack: str, defense: str, epochs: int) -> Path:
    return work / "runs" / attack / (defense if epochs == DEFAULT_EPOCHS else f"{defense}-e{epochs}")
