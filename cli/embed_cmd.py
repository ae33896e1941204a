"""`safeclip embed`: image and text embeddings plus similarity for every pair."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sanitize.stages.config import EmbedConfig

from .common import done, fail, progress_counter, user_errors, warn


DEFAULTS = EmbedConfig()


def embed(
    source: str = typer.Argument(..., help="Pair source: img2dataset webdataset/parquet folder, "
                                           "brace pattern of .tar files, CSV/TSV, or image+.txt folder."),
    checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="Checkpoint from `safeclip warmup`/`pretrain`."),
    model: str = typer.Option(None, "--model", help="With --pretrained: the open_clip architecture (e.g. ViT-B-32) "
                                                    "or a model config .json the weights are for."),
    pretrained: Path = typer.Option(None, "--pretrained", help="Local open_clip weights instead of --checkpoint "
                                                              "(e.g. open_clip_train's epoch_N.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one Parquet file per input shard + embed.json."),
    format: str = typer.Option(None, "--format", help="Force the source format: webdataset, parquet, csv, folder."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, help="Pairs per forward pass."),
    dtype: str = typer.Option(DEFAULTS.dtype, help="Stored embedding precision: float16 or float32."),
    augment: bool = typer.Option(False, "--augment", help="Embed one SafeCLIP-augmented view instead of the plain image."),
    workers: Optional[int] = typer.Option(DEFAULTS.workers, help="DataLoader workers decoding images (each takes "
                                                                 "whole shards, or a lane of every shard when "
                                                                 "shards are fewer than workers) [half the cores]."),
    threads: int = typer.Option(DEFAULTS.threads, help="torch CPU threads; 0 = $OMP_NUM_THREADS if set, else one "
                                                       "per core the workers leave free."),
    device: str = typer.Option(DEFAULTS.device, help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed for --augment."),
    image_column: str = typer.Option("filepath", help="CSV: image path column."),
    caption_column: str = typer.Option("title", help="CSV: caption column."),
    duplicate_keys: str = typer.Option(DEFAULTS.duplicate_keys, "--duplicate-keys",
                                       help="A key that occurs twice in the source: error, or rename (its n-th "
                                            "occurrence becomes KEY~n). See docs/reliability.md."),
    force: bool = typer.Option(False, "--force", help="Delete what OUT holds and start over (needed when it was "
                                                      "made with another checkpoint, source or options)."),
) -> None:
    """Embed every pair and score its image-caption similarity.

    With a safeclip checkpoint (--checkpoint), or with CLIP weights you already have: --model
    ARCH (an open_clip architecture or a config .json) --pretrained WEIGHTS (a local open_clip
    checkpoint, e.g. open_clip_train's epoch_N.pt; nothing is downloaded).

    Writes OUT/NNNNN.parquet with key, caption, url and the source's metadata, L2-normalised
    image_emb and text_emb, and their cosine similarity. Resumable: a rerun skips shards
    already written. Runs under torchrun, one share of the shards per rank.
    """
    import os

    from sanitize.io.pairs import CsvOptions, open_pairs
    from sanitize.stages.embed import run_embed

    config = EmbedConfig(batch_size=batch_size, dtype=dtype, augment=augment, workers=workers, threads=threads,
                         device=device, seed=seed, duplicate_keys=duplicate_keys)
    with user_errors():
        if checkpoint is not None and not checkpoint.exists():
            fail(f"{checkpoint}: no such checkpoint")
        if checkpoint is None and pretrained is None:
            fail("give --checkpoint CKPT (safeclip) or --model ARCH --pretrained WEIGHTS (open_clip)")
        csv_options = CsvOptions(image_column=image_column, caption_column=caption_column)
        total = open_pairs(source, format=format, csv_options=csv_options).count_hint()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        main_rank = int(os.environ.get("RANK", "0")) == 0
        with progress_counter(total // world if total else None, "embed", enabled=main_rank) as advance:
            run = run_embed(source, checkpoint, out, config, model=model, pretrained=pretrained,
                            source_format=format, csv_options=csv_options, on_batch=advance, force=force)
    result = run.result
    if result.skips.total:
        warn(f"rank {run.rank}: {result.skips.summary()}")
    if run.manifest is not None:
        resumed = f", {result.shards_skipped} already done" if result.shards_skipped else ""
        done(f"embedded {result.pairs:,} pairs in {result.shards_done} shard(s){resumed} "
             f"at {result.pairs_per_second:,.0f} pairs/s (rank 0 of {run.world_size}); "
             f"{run.manifest.count:,} pairs in {out}")


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
