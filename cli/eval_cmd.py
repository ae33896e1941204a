"""`safeclip eval`: zero-shot and linear-probe accuracy, attack success, detection quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import done, err_console, fail, out_console, progress, user_errors, warn

HELP = "\n\n".join([
    "Evaluate a model, or how well a split caught the poisons.",
    "With a model (CHECKPOINT, or --model ARCH --pretrained WEIGHTS for open_clip weights) and a labelled "
    "--test source: zero-shot top-1/top-5 and per-class accuracy (prompt ensemble: mean of normalised "
    "template embeddings per class), and, when asked, a linear probe, backdoor attack success and "
    "targeted-poisoning success. With --split PART alone, no model: the split's detection quality.",
    "A test image's class is its metadata `class_name` (when it is one of --classes) or its integer `label`.",
    "--train SRC: logistic regression on standardised frozen image features of SRC, accuracy on --test.",
    "--poison-dir DIR / --manifest PATH (the `safeclip poison` manifest): for each backdoor in it, the "
    "share of --test images not of the target class that are classified as the target with the trigger "
    "applied (ASR), and without it (no-trigger rate); for targeted poisoning, how many target images "
    "(their keys must be in --test) are classified as their adversarial class.",
    "--split PART [--truth MANIFEST]: recall/precision of each attack's poisons in the risky set, AUROC of "
    "p_clean for poison vs clean, and the rank of the first poison (the largest poison-free safe share).",
    "Prints tables (or --json); --out FILE also writes the JSON.",
])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _print_tables(r: dict) -> None:
    if r["zero_shot"] is not None:
        _print_model_tables(r)
    if r["detection"]:
        _print_detection(r["detection"])


def _print_model_tables(r: dict) -> None:
    from rich.table import Table

    zs = r["zero_shot"]
    summary = Table(title=f"safeclip eval — {Path(r['checkpoint']).name} on {r['test']['pairs']:,} test pairs",
                    title_justify="left")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("zero-shot top-1", _pct(zs["top1"]))
    summary.add_row(f"zero-shot top-{zs['top5_k']}", _pct(zs["top5"]))
    if r["linear_probe"]:
        lp = r["linear_probe"]
        summary.add_row("linear probe", f"{_pct(lp['accuracy'])} ({lp['train_n']:,} train)")
    if r["targeted"]:
        t = r["targeted"]
        summary.add_row("targeted poisoning success", f"{t['success']} / {t['total']}")
    summary.add_row("classes / templates", f"{len(r['classes'])} / {r['templates']['count']} "
                                           f"({r['templates']['source']})")
    out_console.print(summary)

    per_class = Table(title="zero-shot accuracy per class", title_justify="left")
    words = r["prompt_names"] if r["prompt_names"] != r["classes"] else None
    for name, justify in (("class", "left"), *((("prompt words", "left"),) if words else ()),
                          ("images", "right"), ("accuracy", "right")):
        per_class.add_column(name, justify=justify)
    for i, row in enumerate(zs["per_class"]):
        per_class.add_row(row["class"], *((words[i],) if words else ()), f"{row['n']:,}", _pct(row["accuracy"]))
    out_console.print(per_class)

    if r["backdoor"]:
        table = Table(title="backdoor attack success (test images not of the target class)", title_justify="left")
        for name in ("attack", "target", "images", "ASR", "no trigger", "lift"):
            table.add_column(name, justify="left" if name in ("attack", "target") else "right")
        for b in r["backdoor"]:
            table.add_row(b["attack"], b["target_class"], f"{b['n']:,}", _pct(b["asr"]), _pct(b["no_trigger"]),
                          "–" if b["lift"] is None else f"{100 * b['lift']:+.1f} pt")
        out_console.print(table)

    if r["targeted"] and r["targeted"]["targets"]:
        t = r["targeted"]
        table = Table(title=f"targeted poisoning: {t['success']} of {t['total']} targets flipped", title_justify="left")
        for name in ("target key", "true class", "adversarial", "predicted", "flipped"):
            table.add_column(name)
        for row in t["targets"]:
            table.add_row(row["key"], row["true_class"] or "?", row["adversarial_class"], row["predicted"],
                          "yes" if row["success"] else "no")
        out_console.print(table)


def _print_detection(d: dict) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"detection: {d['risky']:,} risky of {d['n']:,} pairs (safe share "
                        f"{_pct(d['safe_share'])})", title_justify="left",
                  caption="recall: share of them in risky; prec.: their share of risky; AUROC of "
                          "1 - p_clean vs clean pairs; first: pairs ranked above the first of them; "
                          "free: the largest safe share that holds none of them",
                  caption_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    for name in ("kind", "pairs", "risky", "safe", "recall", "prec.", "AUROC", "first", "free"):
        table.add_column(name, justify="left" if name == "kind" else "right", no_wrap=True)
    for row in d["rows"]:
        table.add_row(row["name"], f"{row['total']:,}", f"{row['in_risky']:,}", f"{row['in_safe']:,}",
                      _pct(row["recall"]), _pct(row["precision"]),
                      "–" if row["auroc"] is None else f"{row['auroc']:.3f}",
                      "–" if row["first_rank"] is None else f"{row['first_rank']:,}",
                      _pct(row["poison_free_share"]))
    out_console.print(table)


def _summary(r: dict) -> str:
    parts = []
    if r["zero_shot"] is not None:
        parts.append(f"zero-shot top-1 {_pct(r['zero_shot']['top1'])} on {r['zero_shot']['n']:,} images")
    if r["linear_probe"]:
        parts.append(f"linear probe {_pct(r['linear_probe']['accuracy'])}")
    for b in r["backdoor"]:
        parts.append(f"{b['attack']} ASR {_pct(b['asr'])} (no trigger {_pct(b['no_trigger'])})")
    if r["targeted"]:
        parts.append(f"targeted {r['targeted']['success']}/{r['targeted']['total']}")
    if r["detection"]:
        d = r["detection"]
        value = d["auroc"]
        parts.append(f"detection AUROC {'–' if value is None else format(value, '.3f')}")
        if r["zero_shot"] is None:  # the split alone: its headline numbers
            everything = next((row for row in d["rows"] if row["kind"] == "poison" and row["name"] == "all poisons"),
                              next((row for row in d["rows"] if row["kind"] == "poison"), None))
            if everything:
                parts.append(f"{everything['in_risky']:,} of {everything['total']:,} poisons in the risky set "
                             f"(recall {_pct(everything['recall'])}), {everything['in_safe']:,} in the safe set "
                             f"({_pct(d['safe_share'])} of {d['n']:,} pairs); poison-free up to "
                             f"{_pct(d['poison_free_share'])}"
                             + ("" if d["headroom"] is None else f" (headroom {100 * d['headroom']:+.1f} pt)"))
    return "eval: " + "; ".join(parts) + f"; {r['timing_s']['total']:.1f} s"


def eval_cmd(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint from `safeclip warmup`/`pretrain` "
                                                          "(none with --model/--pretrained or --split alone)."),
    model: Optional[str] = typer.Option(None, "--model", help="With --pretrained: the open_clip architecture "
                                                             "(e.g. ViT-B-32) or config .json."),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="Local open_clip weights instead of "
                                                                        "CHECKPOINT (e.g. epoch_N.pt)."),
    test: Optional[str] = typer.Option(None, "--test", help="Labelled test pair source (metadata `label` or "
                                                            "`class_name`); needed with a model."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class names in label order: a built-in set "
                                                      "(fashion-mnist), a file (one a line) or a comma list; "
                                                      "name=words prompts with other words."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Prompt templates file, one a line with "
                                                                      "{} for the class (default: shipped set)."),
    train: Optional[str] = typer.Option(None, "--train", help="Labelled train source for the linear probe."),
    poison_dir: Optional[Path] = typer.Option(None, "--poison-dir", help="A `safeclip poison` output: its "
                                                                         "manifest.parquet drives ASR/targeted."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="The poison manifest.parquet itself."),
    split: Optional[Path] = typer.Option(None, "--split", help="A `safeclip split` folder to score."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Manifest for --split (default: --manifest, "
                                                              "else found beside the split's source)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON result to this file."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the linear probe."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads; 0 = $OMP_NUM_THREADS if set, "
                                                            "else every core."),
    max_iter: int = typer.Option(1000, "--max-iter", min=1, help="Linear probe: logistic regression iterations."),
) -> None:
    """Evaluate a checkpoint (see HELP)."""
    from sanitize.evaluation.evaluate import EvalConfig, evaluate
    from sanitize.io.artifacts import find_poison_manifest
    from sanitize.io.shards import atomic_write_json
    from sanitize.evaluation.templates import load_classes, load_templates
    from sanitize.train.distributed import resolve_device

    with user_errors():
        if out is not None and (out.is_dir() or not out.parent.is_dir()):
            fail(f"{out}: is a folder; --out takes a file name" if out.is_dir()
                 else f"{out.parent}: no such folder for --out")
        if checkpoint is not None and pretrained is not None:
            fail("give CHECKPOINT (safeclip) or --model ARCH --pretrained WEIGHTS (open_clip), not both")
        with_model = checkpoint is not None or pretrained is not None
        if with_model and (test is None or classes is None):
            fail("evaluating a model needs --test SRC and --classes (or give --split PART alone)")
        class_set = load_classes(classes) if classes is not None else None
        prompts = load_templates(templates)
        manifest_file = find_poison_manifest(poison_dir, manifest) if (poison_dir or manifest) else None
        if truth is not None and split is None:
            fail("--truth is for --split; give --split PART too")
        device = str(resolve_device(device))  # no CUDA, or a bogus name: one line before any work
        config = EvalConfig(checkpoint=str(checkpoint) if checkpoint else None, test=test,
                            classes=list(class_set.names) if class_set else [],
                            model=model, pretrained=str(pretrained) if pretrained else None,
                            prompt_names=list(class_set.prompt_names) if class_set else None, templates=prompts,
                            templates_source=str(templates) if templates else "default", train=train,
                            manifest=manifest_file, split=str(split) if split else None,
                            truth=str(truth) if truth else None, batch_size=batch_size, device=device,
                            seed=seed, max_iter=max_iter, threads=threads)
        result = evaluate(config, track=progress)  # CheckpointError is a ValueError: one line
    for message in result["warnings"]:
        warn(message)
    if out is not None:
        try:
            atomic_write_json(out, result)
        except OSError as exc:
            fail(f"{out}: cannot write ({exc.strerror or exc})")
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        err_console.print(_summary(result), highlight=False, markup=False, soft_wrap=True)
    else:
        _print_tables(result)
        done(_summary(result) + (f" -> {out}" if out else ""))


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP)(eval_cmd)
