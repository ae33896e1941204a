"""docs/results.md and docs/results.png from the cells `defense.py` cached.

Cells not run yet appear as "not run" rows, so the table never pretends to be complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from defense import ATTACKS, DEFENSES


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def attack_success(cell: dict) -> str:
    """Targeted: x/N flipped. Backdoors: ASR (no-trigger rate)."""
    ev = cell["eval"]
    parts = []
    if ev.get("targeted"):
        parts.append(f"TDPA {ev['targeted']['success']}/{ev['targeted']['total']}")
    for row in ev.get("backdoor") or []:
        parts.append(f"{row['attack']} {_pct(row['asr'])} ({_pct(row['no_trigger'])})")
    return "; ".join(parts) or "–"


def detection(cell: dict) -> str:
    det = cell["eval"].get("detection")
    if not det:
        return "no split"
    poison_rows = [r for r in det["rows"] if r["name"] not in ("noise", "all poisons")]
    recall = sum(r["in_risky"] for r in poison_rows) / max(1, sum(r["total"] for r in poison_rows))
    precision = sum(r["in_risky"] for r in poison_rows) / max(1, det["risky"])
    return (f"{_pct(recall)} / {_pct(precision)}, AUROC {det['auroc']:.3f}, "
            f"poison-free up to {_pct(det['poison_free_share'])} (safe {_pct(det['safe_share'])})")


def write_results(results: Path, docs: Path) -> None:
    """Write docs/results.md + results.png, and copy each cell's JSON (commands, timings,
    full eval output) to docs/results/ so the table's sources are committed with it."""
    rows, cells = [], {}
    (docs / "results").mkdir(parents=True, exist_ok=True)
    for attack in ATTACKS:
        for defense in DEFENSES:
            path = results / f"{attack}__{defense}.json"
            if not path.exists():
                rows.append(f"| {attack} | {defense} | not run | | | | | |")
                continue
            cell = json.loads(path.read_text())
            cells[(attack, defense)] = cell
            (docs / "results" / path.name).write_text(path.read_text())
            ev = cell["eval"]
            probe = (ev.get("linear_probe") or {}).get("accuracy")
            rows.append(f"| {attack} | {defense} | {_pct(ev['zero_shot']['top1'])} | {_pct(probe)} | "
                        f"{attack_success(cell)} | {detection(cell)} | {cell['train_seconds'] / 60:.0f} min | "
                        f"[json](results/{attack}__{defense}.json) |")
    lines = [
        "# Defense benchmark: captioned Fashion-MNIST",
        "",
        "Produced by `python benchmarks/defense.py --work bench --cell ATTACK:DEFENSE` (one cell at a time)",
        "and `python benchmarks/defense.py --work bench --table`. Every cell's exact commands and wall",
        "times are in its JSON (docs/results/ATTACK__DEFENSE.json), linked in the last column.",
        "",
        "Attack success: targeted poisoning as flipped targets of 16; backdoors as ASR with the",
        "no-trigger rate in brackets (share of non-target test images classified as the target class",
        "without the trigger). Detection: recall / precision of poisons in the risky set at the first",
        "split, AUROC of p_clean, and the largest poison-free safe share.",
        "",
        f"Cells run: {len(cells)} of {len(ATTACKS) * len(DEFENSES)}. The issue's targets are met only when"
        " every row is filled in and says so; an empty row is not a result.",
        "",
        *(["![attack success and clean accuracy per defense](results.png)", ""] if cells else []),
        "| attack | defense | zero-shot top-1 | linear probe | attack success | detection (first split) | train time | cell |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    (docs / "results.md").write_text("\n".join(lines))
    if cells:
        _figure(cells, docs / "results.png")


def _figure(cells: dict, path: Path) -> None:
    """Per attack: attack success and clean accuracy for each defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ATTACKS if any((a, d) in cells for d in DEFENSES)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(DEFENSES)
    for i, defense in enumerate(DEFENSES):
        success, accuracy = [], []
        for attack in attacks:
            cell = cells.get((attack, defense))
            if cell is None:
                success.append(0.0)
                accuracy.append(0.0)
                continue
            ev = cell["eval"]
            rates = [r["asr"] for r in ev.get("backdoor") or []]
            if ev.get("targeted"):
                rates.append(ev["targeted"]["success"] / max(1, ev["targeted"]["total"]))
            success.append(100 * max(rates) if rates else 0.0)
            accuracy.append(100 * ev["zero_shot"]["top1"])
        xs = [j + i * width for j in range(len(attacks))]
        axes[0].bar(xs, success, width, label=defense)
        axes[1].bar(xs, accuracy, width, label=defense)
    for ax, title in zip(axes, ("attack success (%)", "clean zero-shot top-1 (%)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(attacks))], attacks, rotation=20)
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
