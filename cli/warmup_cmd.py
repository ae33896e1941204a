"""`safeclip warmup`: SafeCLIP phases 1–2 (unimodal, then low-LR CLIP warm-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sanitize.stages.config import WarmupConfig

from .common import EpochBar, done, fail, user_errors, warn

W = WarmupConfig()  # the library's defaults, shown and passed on


def warmup(
    src: str = typer.Argument(..., help="Pair source: img2dataset webdataset/parquet folder, .tar pattern, "
                                        "CSV/TSV, or a folder of images with .txt captions."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (rewritten after every epoch)."),
    model: str = typer.Option(W.model, help="open_clip architecture name, a shipped config "
                                                       "(safeclip-tiny-vit, safeclip-small-vit) or a config .json."),
    pretrained: Optional[str] = typer.Option(None, help="Local open_clip weights to start from, for "
                                                        "--model (e.g. open_clip_train's epoch_N.pt; "
                                                        "nothing is downloaded)."),
    unimodal_epochs: int = typer.Option(W.unimodal_epochs, help="Phase 1: epochs of image-only and text-only "
                                                                "contrastive learning."),
    clip_epochs: int = typer.Option(W.clip_epochs, help="Phase 2: epochs of CLIP loss at --clip-lr-scale x --lr."),
    clip_lr_scale: float = typer.Option(W.clip_lr_scale, help="Learning-rate factor for the CLIP warm-up."),
    batch_size: int = typer.Option(W.batch_size, help="Pairs per batch."),
    lr: float = typer.Option(W.lr, help="Base learning rate (AdamW)."),
    weight_decay: float = typer.Option(W.weight_decay, "--wd", help="AdamW weight decay (none on norms, biases, "
                                                                    "logit scale)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear LR warm-up steps per phase "
                                                          "[default: 10% of the phase's steps]."),
    temperature: float = typer.Option(W.temperature, help="Temperature of the unimodal InfoNCE loss."),
    memory_bank: int = typer.Option(W.memory_bank, help="NNCLR memory bank size per modality; 0 = in-batch InfoNCE."),
    eda_alpha: float = typer.Option(W.eda_alpha, help="EDA strength: fraction of caption words changed."),
    precision: str = typer.Option(W.precision, help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this value."),
    # 1, not the library's 0: a worker process decodes and augments while this one trains
    workers: int = typer.Option(1, help="DataLoader worker processes (decode + augment); 0 and 1 give "
                                        "identical batches."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(0, help="torch CPU threads for the training process; 0 = $OMP_NUM_THREADS "
                                        "if set, else one per core not used by --workers. Fewer than the "
                                        "cores is faster on a busy machine."),
    seed: int = typer.Option(W.seed, help="Seed for model init, data order and augmentations."),
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
    """SafeCLIP warm-up: unimodal epochs, then low-LR CLIP epochs.

    Phase 1 trains each tower on its own modality (two augmented views of each image, two EDA
    views of each caption); phase 2 trains the CLIP loss at --clip-lr-scale x --lr. Start from
    your own open_clip weights with --model and --pretrained.
    """
    from sanitize.io.pairs import CsvOptions
    from sanitize.stages.warmup import check_output, ignored_on_resume, run_warmup
    from sanitize.train.distributed import resolve_device

    config = WarmupConfig(model=model, pretrained=pretrained, unimodal_epochs=unimodal_epochs,
                          clip_epochs=clip_epochs, batch_size=batch_size, lr=lr, clip_lr_scale=clip_lr_scale,
                          weight_decay=weight_decay, warmup_steps=warmup_steps, temperature=temperature,
                          memory_bank=memory_bank, eda_alpha=eda_alpha, precision=precision,
                          grad_clip=grad_clip, seed=seed, num_workers=workers)
    if threads < 0:
        fail("--threads must be >= 0")
    if max_steps is not None and max_steps < 1:
        fail("--max-steps must be >= 1")
    with user_errors():
        resolve_device(device)
        check_output(out, resume=resume, overwrite=overwrite)
        ignored = ignored_on_resume(out, config) if resume else []
        if ignored:
            flags = {"num_workers": "workers", "weight_decay": "wd"}
            warn("resuming with the checkpoint's saved settings; ignoring "
                 + ", ".join(f"--{flags.get(k, k).replace('_', '-')}" for k in ignored))
        with EpochBar() as bar:
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


def register(app: typer.Typer) -> None:
    app.command("warmup")(warmup)
