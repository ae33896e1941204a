"""`safeclip embed`: image and text embeddings plus similarity for every pair."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import done, fail, progress_counter, user_errors, warn


def embed(
    source: str = typer.Argument(..., help="Pair source: img2dataset webdataset/parquet folder, "
                                           "brace pattern of .tar files, CSV/TSV, or image+.txt folder."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Checkpoint from `safeclip warmup`/`pretrain`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one Parquet file per input shard + embed.json."),
    format: str = typer.Option(None, "--format", help="Force the source format: webdataset, parquet, csv, folder."),
    batch_size: int = typer.Option(256, help="Pairs per forward pass."),
    dtype: str = typer.Option("float16", help="Stored embedding precision: float16 or float32."),
    augment: bool = typer.Option(False, "--augment", help="Embed one SafeCLIP-augmented view instead of the plain image."),
    workers: int = typer.Option(2, help="DataLoader workers decoding images (each takes whole shards)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, help="Seed for --augment."),
    image_column: str = typer.Option("filepath", help="CSV: image path column."),
    caption_column: str = typer.Option("title", help="CSV: caption column."),
) -> None:
    """Embed every pair with a checkpoint (resumable; runs under torchrun, one share of shards per rank).

    Writes OUT/NNNNN.parquet with key, caption, url and the source's metadata, L2-normalised
    image_emb and text_emb, and their cosine similarity. Rerunning skips shards already written.
    """
    import torch

    from sanitize.train.augment import eval_transform, train_transform
    from sanitize.models.checkpoint import load_checkpoint
    from sanitize.stages.embed import distributed_context, embed_source, write_manifest
    from sanitize.io.pairs import CsvOptions, open_pairs

    with user_errors():
        pair_source = open_pairs(source, format=format,
                                 csv_options=CsvOptions(image_column=image_column, caption_column=caption_column))
        if not checkpoint.exists():
            fail(f"{checkpoint}: no such checkpoint")
        model, tokenizer, image_size, _config, _state = load_checkpoint(str(checkpoint))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        rank, world = distributed_context()
        if device.startswith("cuda") and world > 1:
            device = f"cuda:{int(__import__('os').environ.get('LOCAL_RANK', 0))}"
        if augment:
            torch.manual_seed(seed + rank)
            transform = train_transform(image_size)
        else:
            transform = eval_transform(image_size)

        total = pair_source.count_hint()
        with progress_counter(total // world if total else None, "embed", enabled=rank == 0) as advance:
            result = embed_source(pair_source, model, tokenizer, transform, out, batch_size=batch_size,
                                  dtype=dtype, num_workers=workers, device=device, rank=rank,
                                  world_size=world, on_batch=advance)
        if world > 1:
            torch.distributed.barrier()
        if result.skips.total:
            warn(f"rank {rank}: {result.skips.summary()}")
        if rank == 0:
            manifest = write_manifest(out, checkpoint=str(checkpoint), source=pair_source, dtype=dtype,
                                      augment=augment, seconds=result.seconds, world_size=world,
                                      extra={"pairs_per_second_rank0": round(result.pairs_per_second, 1),
                                             "skips_rank0": result.skips.as_dict()})
            resumed = f", {result.shards_skipped} already done" if result.shards_skipped else ""
            done(f"embedded {result.pairs:,} pairs in {result.shards_done} shard(s){resumed} "
                 f"at {result.pairs_per_second:,.0f} pairs/s (rank 0 of {world}); "
                 f"{manifest['count']:,} pairs in {out}")
        if world > 1:
            torch.distributed.destroy_process_group()


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
