"""`safeclip poison`: a poisoned copy of a pair source plus its ground-truth manifest."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import done, progress, user_errors, warn


def poison_cmd(
    src: str = typer.Argument(..., help="Pair source (shards folder, .tar pattern, parquet, CSV, folder)."),
    out: Path = typer.Option(..., "--out", help="New folder for the poisoned shards and manifest."),
    attack: str = typer.Option(..., "--attack",
                               help="targeted | badnet | blended | wanet | label-consistent"),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing pairs, captions, trigger patterns."),
    target_class: Optional[str] = typer.Option(
        None, "--target-class", help="The class poisons should evoke (any name; e.g. trouser, frog). "
                                     "Fashion-MNIST names get generated captions, others "
                                     "'a photo of a NAME' unless --target-caption is given."),
    target_caption: Optional[List[str]] = typer.Option(
        None, "--target-caption", help="A caption poison pairs carry (repeat for several; one is drawn "
                                       "per poison pair)."),
    target_captions: Optional[Path] = typer.Option(
        None, "--target-captions", help="A text file of captions poison pairs carry, one a line."),
    count: Optional[int] = typer.Option(None, "--count", help="Backdoors: number of poison pairs to add."),
    share: Optional[float] = typer.Option(
        None, "--share", help="Backdoors: poison pairs as a share of the source (default 0.0025)."),
    targets: int = typer.Option(16, "--targets", help="Targeted: number of target images."),
    copies: int = typer.Option(25, "--copies", help="Targeted: poison pairs per target."),
    target_source: Optional[str] = typer.Option(
        None, "--target-source", help="Targeted: where the target images come from (any pair source: "
                                      "the test set, a folder, a CSV)."),
    trigger: str = typer.Option("badnet", "--trigger",
                                help="Label-consistent: which trigger (badnet | blended | wanet)."),
    patch_size: float = typer.Option(3, "--patch-size", help="BadNet: patch side in px of a 28-px image "
                                     "(scaled with the image)."),
    position: str = typer.Option("bottom-right", "--position",
                                 help="BadNet: corner (bottom-right, top-left, ..., center) or X,Y."),
    pattern: str = typer.Option("checkerboard", "--pattern", help="BadNet: checkerboard | white | random."),
    alpha: float = typer.Option(0.2, "--alpha", help="Blended: weight of the pattern."),
    blend_image: Optional[Path] = typer.Option(
        None, "--blend-image", help="Blended: an image to blend in instead of seeded noise."),
    strength: float = typer.Option(0.5, "--strength", help="WaNet: warping strength s."),
    grid_size: int = typer.Option(4, "--grid-size", help="WaNet: control grid size k."),
    samples_per_shard: int = typer.Option(10000, "--samples-per-shard"),
) -> None:
    """Add poison pairs to a copy of SRC, with a ground-truth manifest.

    Poison pairs are added copies, as in the papers' setting: every source pair
    is kept with its key and the dataset grows by the poison pairs (new keys
    poison-ATTACK-NNNNNN, scattered among the clean ones). OUT gets the shards,
    manifest.parquet (key, attack, kind, target_class, true_class, source_key,
    trigger) and poison.json. For several attacks at once, run poison again on
    OUT: the manifest is kept and extended.

    Any data: backdoors put the trigger on copies of any source images, targeted
    poisoning copies images of --target-source (any pair source), and poison
    pairs carry captions you give (--target-caption, --target-captions) or, for a
    Fashion-MNIST --target-class, generated ones. Score a split of the result with
    `safeclip eval --split PART`.
    """
    from sanitize.attacks import triggers
    from sanitize.attacks.poison import PoisonConfig, poison, read_captions

    with user_errors():
        spec = triggers.spec_for_attack(attack, trigger, seed=seed, patch_size=patch_size, position=position,
                                        pattern=pattern, alpha=alpha, strength=strength, grid_size=grid_size,
                                        blend_image=str(blend_image) if blend_image else None)
        captions = list(target_caption or []) + (read_captions(target_captions) if target_captions else [])
        config = PoisonConfig(attack=attack, seed=seed, target_class=target_class, count=count, share=share,
                              trigger=spec, targets=targets, copies=copies, target_source=target_source,
                              target_captions=captions or None)
        summary = poison(src, out, config, samples_per_shard, wrap=progress)
    run = summary["runs"][-1]
    skipped = run["skipped_source_pairs"]["total"]
    if skipped:
        warn(f"{skipped} source pairs could not be read and were skipped: "
             f"{run['skipped_source_pairs']['by_reason']}")
    what = (f"{len(run['targets'])} targets x {copies}" if attack == "targeted"
            else f"target class {target_class!r}" if target_class else "target captions")
    if captions:
        what += f", {len(captions)} caption(s) given"
    done(f"added {run['poison_pairs']:,} {attack} poison pairs ({what}); {summary['counts']['total']:,} "
         f"pairs written to {out} with manifest.parquet and poison.json")


def register(app: typer.Typer) -> None:
    app.command("poison")(poison_cmd)
