"""`safeclip warmup`: SafeCLIP phases 1–2 (unimodal, then low-LR CLIP warm-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import EpochBar, default_threads, done, fail, user_errors, warn


def warmup(
    src: str = typer.Argument(..., help="Pair source: img2dataset webdataset/parquet folder, .tar pattern, "
                                        "CSV/TSV, or a folder of images with .txt captions."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (rewritten after every epoch)."),
    model: str = typer.Option("safeclip-tiny-vit", help="open_clip architecture name, a shipped config "
                                                       "(safeclip-tiny-vit, safeclip-small-vit) or a config .json."),
    pretrained: Optional[str] = typer.Option(None, help="Local open_clip checkpoint to start from "
                                                        "(nothing is downloaded)."),
    unimodal_epochs: int = typer.Option(5, help="Phase 1: epochs of image-only and text-only contrastive learning."),
    clip_epochs: int = typer.Option(1, help="Phase 2: epochs of CLIP loss at --clip-lr-scale x --lr."),
    clip_lr_scale: float = typer.Option(0.01, help="Learning-rate factor for the CLIP warm-up."),
    batch_size: int = typer.Option(128, help="Pairs per batch."),
    lr: float = typer.Option(5e-4, help="Base learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.1, "--wd", help="AdamW weight decay (none on norms, biases, logit scale)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear LR warm-up steps per phase "
                                                          "[default: 10% of the phase's steps]."),
    temperature: float = typer.Option(0.1, help="Temperature of the unimodal InfoNCE loss."),
    memory_bank: int = typer.Option(4096, help="NNCLR memory bank size per modality; 0 = in-batch InfoNCE."),
    eda_alpha: float = typer.Option(0.1, help="EDA strength: fraction of caption words changed."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this value."),
    workers: int = typer.Option(1, help="DataLoader worker processes (decode + augment); 0 and 1 give "
                                        "identical batches."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(0, help="torch CPU threads for the training process; 0 = $OMP_NUM_THREADS "
                                        "if set, else one per core not used by --workers. Fewer than the "
                                        "cores is faster on a busy machine."),
    seed: int = typer.Option(0, help="Seed for model init, data order and augmentations."),
    source_format: Optional[str] = typer.Option(None, "--format", help="Force the source format "
                                                                      "(webdataset, parquet, csv, folder)."),
    image_column: str = typer.Option("filepath", help="CSV: image path column."),
    caption_column: str = typer.Option("title", help="CSV: caption column."),
    resume: bool = typer.Option(False, help="Continue the interrupted warm-up saved at --out "
                                            "(its saved settings are used)."),
    overwrite: bool = typer.Option(False, help="Replace an existing checkpoint at --out."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps in total, "
                                                       "saving a checkpoint that --resume continues."),
) -> None:
    """SafeCLIP warm-up: unimodal contrastive epochs, then low-learning-rate CLIP epochs."""
    import torch

    from sanitize.io.pairs import CsvOptions
    from sanitize.stages.warmup import WarmupConfig, run_warmup

    if out.exists() and not (resume or overwrite):
        fail(f"{out} exists; pass --resume to continue it or --overwrite to start again")
    if device != "auto" and device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA device is available")
    config = WarmupConfig(model=model, pretrained=pretrained, unimodal_epochs=unimodal_epochs,
                          clip_epochs=clip_epochs, batch_size=batch_size, lr=lr, clip_lr_scale=clip_lr_scale,
                          weight_decay=weight_decay, warmup_steps=warmup_steps, temperature=temperature,
                          memory_bank=memory_bank, eda_alpha=eda_alpha, precision=precision,
                          grad_clip=grad_clip, seed=seed, num_workers=workers)
    if threads < 0 or workers < 0:
        fail("--threads and --workers must be >= 0")
    if max_steps is not None and max_steps < 1:
        fail("--max-steps must be >= 1")
    if threads == 0:
        threads = default_threads(workers)
    if resume and not out.exists():
        fail(f"{out}: nothing to resume (no checkpoint there yet)")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        with user_errors():
            _warn_ignored_options(out, config)
    with user_errors(), EpochBar() as bar:
        result = run_warmup(src, out, config, resume=resume, device=device, max_steps=max_steps,
                            source_format=source_format, threads=threads,
                            csv_options=CsvOptions(image_column=image_column, caption_column=caption_column),
                            on_epoch_start=bar.epoch_start, on_step=bar.step)
    skipped = result.epochs[0]["skipped"] if result.epochs else {}
    if skipped:
        warn("skipped pairs: " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
    last = {r["phase"]: r for r in result.epochs}
    losses = "; ".join(f"{phase} loss {r['loss']:.3f}" for phase, r in last.items())
    if result.finished:
        done(f"warm-up done: {len(result.epochs)} epochs, {result.global_step} steps ({losses}) -> {out} "
             f"(metrics {result.metrics_path})")
    else:
        done(f"warm-up stopped after {result.global_step} steps ({losses or 'no epoch finished'}); "
             f"continue with --resume -> {out}")


def _warn_ignored_options(out: Path, config) -> None:
    """A resumed run replays its saved settings; say which options given now differ."""
    from sanitize.models.checkpoint import read_checkpoint

    saved = read_checkpoint(out)["training_state"].get("warmup_config", {})
    given = config.to_dict()
    defaults = type(config)().to_dict()
    differing = [k for k, v in given.items() if v != defaults.get(k) and k in saved and saved[k] != v]
    if differing:
        flags = {"num_workers": "workers", "weight_decay": "wd"}
        warn("resuming with the checkpoint's saved settings; ignoring "
             + ", ".join(f"--{flags.get(k, k).replace('_', '-')}" for k in differing))


def register(app: typer.Typer) -> None:
    app.command("warmup")(warmup)
