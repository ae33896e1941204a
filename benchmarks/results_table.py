"""docs/results.md and docs/results.png from the cells `defense.py` cached.

Cells not run yet appear as "not run" rows, so the table never pretends to be complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from cells import ATTACKS, DATASETS, DEFENSES, NOISE_ROW, STRONGER, SWEEP, TB_COUNTS, VARIANTS, cell_name

ALL_DEFENSES = DEFENSES + VARIANTS
# An attack "took" when its ASR is at least this far above the no-trigger rate.
TOOK = 0.10


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _points(gap: float) -> str:
    """A signed gap in points for display; the checks compare the unrounded value."""
    return f"{round(gap, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


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


def gpu_name(cell: dict) -> str | None:
    """The GPU a cell ran on (its `machine`, e.g. "16 CPU cores, NVIDIA H200"), or None."""
    _, _, gpu = cell.get("machine", "").partition(", ")
    return gpu.replace("NVIDIA ", "") or None


def train_time(cell: dict) -> str:
    minutes = cell.get("train_seconds_with_warmup", cell["train_seconds"]) / 60
    gpu = gpu_name(cell)
    return (f"{minutes:.0f} min" + (f" on an {gpu}" if gpu else "")
            + (" (incl. shared warm-up)" if cell.get("warmup_shared_from") else ""))


def attack_did_not_take(cell: dict | None) -> bool:
    """An undefended cell whose attacks all stayed below TOOK above the no-trigger rate:
    defending against it would show nothing, so its row's defenses need not run."""
    if cell is None or cell["eval"].get("targeted"):
        return False
    rows = cell["eval"].get("backdoor") or []
    return bool(rows) and all(r["asr"] - r["no_trigger"] < TOOK for r in rows)


def why_not_run(attack: str, defense: str, cells: dict, long_cells: dict[int, dict]) -> str:
    """The reason a grid row is empty, when one is known: the attack did not take without
    defense, or the cell ran at more epochs only ("Longer runs")."""
    longer = any(attack == a for c in long_cells.values() for a, _ in c)
    if attack_did_not_take(cells.get((attack, "none"))):
        return " (the attack did not take without defense" + ("; see Longer runs)" if longer else ")")
    if any((attack, defense) in c for c in long_cells.values()):
        return " at these epochs (measured at more: see Longer runs)"
    return ""


def target_checks(cells: dict, suffix: str = "") -> list[str]:
    """The issue's targets, checked against every cell that can speak to them (each cell
    against the undefended cell of the same attack and epochs)."""
    lines = []
    for (attack, defense), cell in sorted(cells.items(), key=lambda kv: (ATTACKS.index(kv[0][0]),
                                                                        ALL_DEFENSES.index(kv[0][1]))):
        ev, checks = cell["eval"], []
        targeted = ev.get("targeted")
        backdoors = ev.get("backdoor") or []
        if defense == "none":
            if targeted:
                ok = targeted["success"] >= 12
                checks.append(f"targeted {targeted['success']}/{targeted['total']} flipped, needs >= 12: "
                              f"{'met' if ok else 'MISSED'}")
            for row in backdoors:
                if row["attack"] == "badnet":
                    ok = row["asr"] >= 0.8
                    checks.append(f"BadNet ASR {_pct(row['asr'])}, needs >= 80%: {'met' if ok else 'MISSED'}")
        elif defense.startswith("safeclip"):
            if targeted:
                ok = targeted["success"] == 0
                checks.append(f"targeted {targeted['success']}/{targeted['total']}, needs 0: "
                              f"{'met' if ok else 'MISSED'}")
            base = cells.get((attack, "none"))
            base_rows = (base["eval"].get("backdoor") or []) if base else []
            base_asr = {r["attack"]: r["asr"] - r["no_trigger"] for r in base_rows}
            for row in backdoors:
                gap = 100 * (row["asr"] - row["no_trigger"])
                check = (f"{row['attack']} ASR {_pct(row['asr'])} vs no-trigger {_pct(row['no_trigger'])} "
                         f"({_points(gap)} pt), needs within 1 pt: {'met' if gap <= 1.0 else 'MISSED'}")
                if row["attack"] in base_asr and base_asr[row["attack"]] < TOOK:
                    check += " (but the attack did not take without defense either, so this shows nothing)"
                checks.append(check)
            if base is not None:
                gap = 100 * (ev["zero_shot"]["top1"] - base["eval"]["zero_shot"]["top1"])
                checks.append(f"zero-shot {_points(gap)} pt vs none at {cell['epochs']} epochs, needs >= -1 pt: "
                              f"{'met' if gap >= -1.0 else 'MISSED'}")
        if checks:
            lines.append(f"- **{attack} / {defense}{suffix}**: " + "; ".join(checks) + ".")
    return lines


def detection_rows(cells: dict, suffix: str = "") -> list[str]:
    """Per attack (and caption noise) in every cell that split: where its pairs went."""
    rows = []
    for (attack, defense), cell in cells.items():
        det = cell["eval"].get("detection")
        for r in (det or {}).get("rows", []):
            rows.append(f"| {attack} / {defense}{suffix} | {r['name']} | {r['in_risky']}/{r['total']} | "
                        f"{r['auroc']:.3f} | {_pct(r['poison_free_share'])} |")
    return rows


def leak_rows(cells: dict, suffix: str = "") -> list[str]:
    """Per split of every cell: the non-clean pairs the safe set (the CLIP loss) held."""
    rows = []
    for (attack, defense), cell in cells.items():
        for split in cell.get("safe_leaks") or []:
            leaked = ", ".join(f"{kind} {n}" for kind, n in split["not_clean"].items()) or "none"
            rows.append(f"| {attack} / {defense}{suffix} | {split['split']} | {split['safe']:,} | {leaked} |")
    return rows


def table_row(cell: dict, name: str, with_epochs: bool = False) -> str:
    ev = cell["eval"]
    probe = (ev.get("linear_probe") or {}).get("accuracy")
    epochs = f" {cell['epochs']} |" if with_epochs else ""
    return (f"| {cell['attack']} | {cell['defense']} |{epochs} {_pct(ev['zero_shot']['top1'])} | {_pct(probe)} | "
            f"{attack_success(cell)} | {detection(cell)} | {train_time(cell)} | [json](results/{name}.json) |")


def long_runs(results: Path, docs: Path) -> tuple[dict[int, dict], list[str]]:
    """Cells run with other epochs than the table's: their own rows, and attack success
    after each epoch (a backdoor that needs more epochs to take shows it here)."""
    by_epochs: dict[int, dict] = {}
    for path in sorted(results.glob("*__*_epochs.json")):
        cell = json.loads(path.read_text())
        if cell["attack"] not in ATTACKS:
            continue  # a data variant (tb@20k, ...): the size sweep's section
        by_epochs.setdefault(cell["epochs"], {})[(cell["attack"], cell["defense"])] = cell
        (docs / "results" / path.name).write_text(path.read_text())
    if not by_epochs:
        return by_epochs, []
    lines = ["## Longer runs", "",
             "The same cells with more epochs (`--epochs N`; every checkpoint kept, and the attack",
             "evaluated after each epoch from the third on).", "",
             "| attack | defense | epochs | zero-shot top-1 | linear probe | attack success | detection (first split) "
             "| train time | cell |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    epoch_rows = []
    for epochs, cells in sorted(by_epochs.items()):
        for (attack, defense), cell in sorted(cells.items(), key=lambda kv: (ATTACKS.index(kv[0][0]),
                                                                            ALL_DEFENSES.index(kv[0][1]))):
            lines.append(table_row(cell, cell_name(attack, defense, epochs), with_epochs=True))
            for epoch, ev in sorted((cell.get("by_epoch") or {}).items(), key=lambda kv: int(kv[0])):
                success = [f"{a} {_pct(v)}" for a, v in ev["backdoor"].items()]
                if ev.get("targeted") is not None:
                    success.insert(0, f"TDPA {ev['targeted']}")
                epoch_rows.append(f"| {attack} / {defense} | {epoch} | {_pct(ev['zero_shot'])} | "
                                  f"{'; '.join(success) or '–'} |")
            final = cell["eval"]
            success = [f"{r['attack']} {_pct(r['asr'])}" for r in final.get("backdoor") or []]
            epoch_rows.append(f"| {attack} / {defense} | {epochs} | {_pct(final['zero_shot']['top1'])} | "
                              f"{'; '.join(success) or '–'} |")
    lines += ["", "| cell | after epoch | zero-shot top-1 | attack success |", "| --- | --- | --- | --- |",
              *epoch_rows, ""]
    for epochs, cells in sorted(by_epochs.items()):
        lines += target_checks(cells, f" ({epochs} epochs)")
    return by_epochs, lines + [""]


def _first_split(cell: dict) -> str:
    """Safe share and what leaked into it at the first and last split of a run."""
    leaks = cell.get("safe_leaks") or []
    if not leaks:
        return "–"

    def one(entry: dict) -> str:
        bad = ", ".join(f"{n} {k}" for k, n in sorted(entry["not_clean"].items()) if k != "noise" and n)
        return f"{entry['safe']:,} ({bad or 'no poison'})"
    return one(leaks[0]) if len(leaks) == 1 else f"{one(leaks[0])} → {one(leaks[-1])}"


def variant_cells(results: Path, docs: Path) -> dict[tuple[str, str, int], dict]:
    """The cells of the data variants (attack `tb@SIZE`): the size sweep, the noise row and the
    decomposition's ablations, keyed (attack, defense, epochs); each JSON copied to docs."""
    found = {}
    for path in sorted(results.glob("*@*__*.json")):
        cell = json.loads(path.read_text())
        found[(cell["attack"], cell["defense"], cell["epochs"])] = cell
        (docs / "results" / path.name).write_text(path.read_text())
    return found


def variant_row(cell: dict) -> str:
    attack, defense, epochs = cell["attack"], cell["defense"], cell["epochs"]
    ev = cell["eval"]
    base, data = attack.split("@", 1)
    data = data if base == "tb" else f"{data}, {base}"  # another attack than the sweep's at that size
    name = cell_name(attack, defense, epochs)
    return (f"| {data} | {defense} | {epochs} | {_pct(ev['zero_shot']['top1'])} | {attack_success(cell)} "
            f"| {_first_split(cell)} | {train_time(cell)} | [json](results/{name}.json) |")


def sweep_lines(cells: dict[tuple[str, str, int], dict]) -> list[str]:
    """The size sweep, the noise row and the 20k decomposition as one table, sorted by data."""
    if not cells:
        return []
    order = {a: i for i, a in enumerate(dict.fromkeys(SWEEP + NOISE_ROW + STRONGER))}
    rows = [variant_row(c) for _, c in sorted(cells.items(), key=lambda kv: (
        order.get(kv[0][0], 99), kv[0][2], ALL_DEFENSES.index(kv[0][1]) if kv[0][1] in ALL_DEFENSES else 99))]
    ran = {a.split("@", 1)[1] for a, _, _ in cells}
    sizes = ", ".join(f"{d}: {t} targets × 25 copies + {b} BadNet" for d, (t, b) in TB_COUNTS.items()
                      if "noise" not in d and d in ran)
    return ["## Dataset size and caption noise", "",
            "Targeted poisoning and BadNet in one dataset (`tb@SIZE`) at several sizes of captioned",
            f"Fashion-MNIST ({sizes}; BadNet at about 0.5% of the pairs), and at 20k pairs with 20%",
            "caption noise instead of 3% (`tb@20k-noise20`, closer to web data). Same `--preset cpu`,",
            "seed and epochs for every defense of a size. Produced by",
            "`python benchmarks/defense.py --work bench --epochs 10 --cell tb@20k:resplit` (and so on per",
            "row). The split column: safe pairs at the first and the last split of the run and the",
            "poisons among them (caption noise left out).", "",
            "![zero-shot and attack success against dataset size](results_size.png)", "",
            "The figure's 60k point is the benchmark's own 60,150-pair cells at the same epochs (\"Longer",
            "runs\"): BadNet ASR from the BadNet cell, targets from the targeted cell, zero-shot their mean.", "",
            "| data | defense | epochs | zero-shot top-1 | attack success | safe set: first → last split "
            "| train time | cell |", "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]


def _sweep_points(cells: dict[tuple[str, str, int], dict], full: dict,
                  defense: str) -> list[tuple[int, float, float, float]]:
    """(pairs, zero-shot %, BadNet ASR %, targets flipped) per size for one defense. Without a
    tb@60k cell, the 60k point is the benchmark's BadNet and targeted cells at the same epochs
    (zero-shot: their mean)."""
    points = []
    for (attack, d, _), cell in cells.items():
        if d == defense and attack in SWEEP:
            ev = cell["eval"]
            points.append((DATASETS[attack.split("@")[1]]["train_size"] or 60000, 100 * ev["zero_shot"]["top1"],
                           100 * max([r["asr"] for r in ev.get("backdoor") or []] or [0]),
                           ev["targeted"]["success"] if ev.get("targeted") else 0))
    badnet, targeted = full.get(("badnet", defense)), full.get(("targeted", defense))
    if badnet and targeted and not any(p[0] == 60000 for p in points):
        points.append((60150, 50 * (badnet["eval"]["zero_shot"]["top1"] + targeted["eval"]["zero_shot"]["top1"]),
                       100 * max(r["asr"] for r in badnet["eval"]["backdoor"]),
                       targeted["eval"]["targeted"]["success"]))
    return sorted(points)


def _size_figure(cells: dict[tuple[str, str, int], dict], full: dict, path: Path) -> None:
    """Zero-shot top-1 and BadNet ASR / targets flipped against the number of pairs, per defense.
    `full`: the 60k cells of the sweep's epochs, keyed (attack, defense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    defenses = sorted({d for a, d, _ in cells if a in SWEEP}, key=lambda d: ALL_DEFENSES.index(d)
                      if d in ALL_DEFENSES else 99)
    for defense in defenses:
        points = _sweep_points(cells, full, defense)
        if not points:
            continue
        sizes, zero_shot, asr, flipped = zip(*points)
        for ax, ys in zip(axes, (zero_shot, asr, flipped)):
            ax.plot(sizes, ys, marker="o", label=defense)
    axes[0].set_ylim(0, 100)
    for ax, title in zip(axes, ("clean zero-shot top-1 (%)", "BadNet ASR (%)", "targets flipped (of 4 at 5k, of 16 above)")):
        ax.set_xscale("log")
        ax.set_xlabel("pairs")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: Path, docs: Path) -> None:
    """Write docs/results.md + results.png, and copy each cell's JSON (commands, timings,
    full eval output) to docs/results/ so the table's sources are committed with it."""
    rows, cells = [], {}
    (docs / "results").mkdir(parents=True, exist_ok=True)
    long_cells, long_lines = long_runs(results, docs)
    variants = variant_cells(results, docs)
    for attack in ("all",) + tuple(a for a in ATTACKS if a != "all"):  # the all-attacks row first
        for defense in ALL_DEFENSES:
            path = results / f"{attack}__{defense}.json"
            if not path.exists() and defense in VARIANTS:
                continue  # ablations appear once run
            if not path.exists():
                rows.append(f"| {attack} | {defense} | not run{why_not_run(attack, defense, cells, long_cells)} "
                            "| | | | | |")
                continue
            cell = json.loads(path.read_text())
            cells[(attack, defense)] = cell
            (docs / "results" / path.name).write_text(path.read_text())
            rows.append(table_row(cell, path.stem))
    long_detection = [r for e, c in sorted(long_cells.items()) for r in detection_rows(c, f" ({e} epochs)")]
    long_leaks = [r for e, c in sorted(long_cells.items()) for r in leak_rows(c, f" ({e} epochs)")]
    lines = [
        "# Defense benchmark: captioned Fashion-MNIST",
        "",
        "Produced by `python benchmarks/defense.py --work bench --cell ATTACK:DEFENSE` (one cell at a time)",
        "and `python benchmarks/defense.py --work bench --table`. Every cell's exact commands and wall",
        "times are in its JSON (docs/results/ATTACK__DEFENSE.json), linked in the last column.",
        "",
        "Setup: captioned Fashion-MNIST from Debian's `dataset-fashion-mnist` (60,000 train pairs,",
        "3% caption noise; 10,000 test images), the shipped `safeclip-tiny-vit`, `--preset cpu`",
        "(batch 512, AdamW lr 1e-3), the same number of epochs for every defense of a row (safeclip:",
        "1 unimodal + 1 CLIP warm-up epoch, then score, split and train every epoch). `none` and",
        "`clip-score` train plain CLIP (`--clip-views auto`); `safeclip` trains its safe set with the",
        "cross-augmented loss. `safeclip-balanced` is `--ranking balanced`; `clip-score` keeps the top",
        "30% by similarity after the same warm-up. Attacks: targeted = 16 test images × 25 poisoned",
        "pairs; each backdoor = 150 pairs (0.25%) whose image carries the trigger and whose caption",
        "names `trouser`; label-consistent = 150 trouser images with the BadNet trigger and their own",
        "captions. In the `all` row every attack is in one dataset (61,000 pairs); BadNet and",
        "label-consistent use the same checkerboard trigger there, so their ASRs are one measurement.",
        "The warm-up of `safeclip-balanced` and `clip-score` is the `safeclip` cell's own (`--warmup-from`),",
        "its time added back into their train time. Machine: 2 CPU cores, no GPU, cells run two at a",
        "time (train times are those of a shared machine), unless the train time names a GPU: those",
        "cells ran on one NVIDIA H200 with 16 CPU cores, three at a time (`--jobs 3`), with",
        "`--workers 2 --precision fp32` (fp32 as on the CPUs; the GPU default would be bf16).",
        "",
        "Attack success: targeted poisoning as flipped targets of 16; backdoors as ASR with the",
        "no-trigger rate in brackets (share of non-target test images classified as the target class",
        "without the trigger). Detection: recall / precision of poisons in the risky set at the first",
        "split, AUROC of p_clean, and the largest poison-free safe share.",
        "",
        f"Cells run: {sum(d in DEFENSES for _, d in cells)} of {len(ATTACKS) * len(DEFENSES)} (plus ablations). The issue's targets are met only when"
        " every row is filled in and says so; an empty row is not a result. A defense is not run against an",
        "attack that did not take without defense at these epochs: it would show nothing.",
        "",
        *(["## The issue's targets, checked", "", *target_checks(cells), ""] if cells else []),
        *(["![attack success and clean accuracy per defense](results.png)", "",
           "Left: the highest attack success among a cell's attacks (targeted: share of the 16 targets",
           "flipped; backdoors: ASR). Right: clean zero-shot top-1 on the 10,000 test images.", ""]
          if cells else []),
        *(["![similarity at the first split, poisons marked](results_similarity.png)", "",
           "Image-caption similarity of every pair at the first split (log scale), poisons by attack; "
           "the dashed line is the lowest similarity in the safe set.", ""]
          if any(c.get("similarity_histogram") for c in cells.values()) else []),
        "| attack | defense | zero-shot top-1 | linear probe | attack success | detection (first split) | train time | cell |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *long_lines,
        *sweep_lines(variants),
        *(["## Detection per attack at the first split", "",
           "Where each kind of pair went at the first split of a run (`safeclip eval --split`): in the",
           "risky set out of all, AUROC of `p_clean` against clean pairs, and the largest safe share that",
           "would still have held none of them.", "",
           "| cell | pairs | in risky | AUROC | poison-free up to |", "| --- | --- | --- | --- | --- |",
           *detection_rows(cells), *long_detection, ""] if detection_rows(cells) + long_detection else []),
        *(["## What each split let into the safe set", "",
           "The safe set is what the CLIP loss trains on, so these are the poisons a defended run",
           "actually learned from, split by split (label-consistent poisons carry true captions, so",
           "a similarity split cannot tell them from clean pairs; `noise` is the 3% caption noise).", "",
           "| cell | split | safe pairs | not clean, in the safe set |", "| --- | --- | --- | --- |",
           *leak_rows(cells), *long_leaks, ""] if leak_rows(cells) + long_leaks else []),
    ]
    notes = Path(__file__).with_name("results_notes.md")  # findings written by hand, kept with the table
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (docs / "results.md").write_text("\n".join(lines))
    if cells:
        _figure(cells, docs / "results.png")
    if any(a in SWEEP for a, _, _ in variants):
        sweep_epochs = max(e for a, _, e in variants if a in SWEEP)
        _size_figure(variants, long_cells.get(sweep_epochs, {}), docs / "results_size.png")
    with_histogram = [c for c in cells.values() if c.get("similarity_histogram")]
    if with_histogram:
        # the cell with the most kinds of poison (the all-attacks one when it has run)
        chosen = max(with_histogram, key=lambda c: (len(c["similarity_histogram"]["counts"]),
                                                    c["defense"] == "safeclip"))
        _similarity_figure(chosen, docs / "results_similarity.png")


def _similarity_figure(cell: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = cell["similarity_histogram"]
    edges = hist["edges"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, counts in hist["counts"].items():
        if name in ("clean", "noise"):
            ax.stairs(counts, edges, fill=True, alpha=0.35, label=f"{name} ({sum(counts):,})")
        else:
            ax.stairs(counts, edges, linewidth=2, label=f"{name} ({sum(counts):,})")
    if hist.get("lowest_safe") is not None:
        ax.axvline(hist["lowest_safe"], color="black", linestyle="--", label="lowest safe similarity")
    ax.set_yscale("log")
    ax.set_xlabel("image-caption cosine similarity")
    ax.set_ylabel("pairs")
    ax.set_title(f"{cell['attack']} / {cell['defense']}: similarity at the first split ({hist['split']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _figure(cells: dict, path: Path) -> None:
    """Per attack: attack success and clean accuracy for each defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ATTACKS if any((a, d) in cells for d in ALL_DEFENSES)]
    defenses = [d for d in ALL_DEFENSES if d in DEFENSES or any((a, d) in cells for a in attacks)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(defenses)
    for i, defense in enumerate(defenses):
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
    # below the panels: inside, it hid the tallest bars
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(ALL_DEFENSES), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
