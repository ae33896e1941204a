"""`safeclip export`: a partition as webdataset shards for open_clip's trainer."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import done, err_console, fail, progress_counter, user_errors, warn


def export(
    part: Path = typer.Argument(..., help="Split folder from `safeclip split` (holds safe/, risky/, split.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for NNNNN.tar shards (img2dataset layout)."),
    partition: str = typer.Option("safe", help="Which partition to export: safe or risky."),
    source: str = typer.Option(None, "--source", help="Original pair source (default: the one recorded in embed.json)."),
    format: str = typer.Option(None, "--format", help="Force the source format."),
    samples_per_shard: int = typer.Option(10000, help="Pairs per output shard."),
) -> None:
    """Write a partition of a split as webdataset shards for open_clip.

    Reads the images from the original source and writes img2dataset's layout with
    sizes.json, which open_clip's trainer reads (pip install 'safeclip[train]'):

    \b
    python -m open_clip_train.main --dataset-type webdataset \\
        --train-data 'OUT/{00000..NNNNN}.tar' --model ViT-B-32 ...
    """
    from sanitize.stages.export import export_partition, open_clip_command, open_clip_trainer_problem
    from sanitize.io.pairs import open_pairs

    with user_errors():
        pair_source = open_pairs(source, format=format) if source else None
        if out.exists() and any(out.glob("*.tar")):
            fail(f"{out}: already holds .tar shards; choose an empty folder")
        with progress_counter(None, f"export {partition}: reading source") as advance:
            stats = export_partition(part, partition, out, source=pair_source,
                                     samples_per_shard=samples_per_shard, on_pair=advance)
    if stats["missing_from_source"]:
        warn(f"{stats['missing_from_source']} key(s) of the partition were not found in the source, "
             f"e.g. {', '.join(stats['missing_examples'][:3])} (listed in {out}/export_stats.json)")
    done(f"exported {stats['written']:,} {partition} pairs of {stats['partition_size']:,} to {out}")
    if stats["written"]:
        err_console.print(f"train on it with open_clip: {open_clip_command(out, stats['shards'])}",
                          highlight=False, markup=False, soft_wrap=True)
        problem = open_clip_trainer_problem()
        if problem:
            warn(problem)
    if stats["missing_from_source"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
