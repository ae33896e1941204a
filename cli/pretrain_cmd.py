"""`safeclip pretrain`: the full SafeCLIP loop (warm-up, then score -> split -> train every epoch)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from .common import EpochBar, default_threads, done, fail, user_errors, warn

PRESET_HELP = ("Fill in every option not given: 'paper' = the official SafeCLIP defaults (RN50, batch 128 per "
               "process, AdamW lr 5e-4 wd 0.1, 10k warm-up steps then cosine, 32 epochs = 5 unimodal + 1 CLIP "
               "warm-up at 0.01 x lr + 26 split epochs, schedule step 0.01 cap 0.85); 'cpu' = the shipped "
               "safeclip-tiny-vit, batch 512, lr 1e-3, 3 epochs = 1 unimodal + 1 CLIP at 0.1 x lr + 1 split "
               "epoch, 10 warm-up steps. Without a preset: the paper's numbers on safeclip-tiny-vit, "
               "10% of each phase as LR warm-up. Explicit options always win.")


def pretrain(
    src: str = typer.Argument(..., help="Pair source: img2dataset webdataset/parquet folder, .tar pattern, "
                                        "CSV/TSV, or a folder of images with .txt captions."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: warmup.pt, checkpoints/, scores/epoch=K/, "
                                                      "splits/epoch=K/, metrics.jsonl, pretrain_stats.json."),
    preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
    defense: str = typer.Option("safeclip", help="safeclip (the full loop); none (plain CLIP on every pair, "
                                                 "no warm-up, never splits: the baseline); clip-score (warm-up, "
                                                 "one split with a fixed fraction/threshold, CLIP on that safe "
                                                 "set only)."),
    model: Optional[str] = typer.Option(None, help="open_clip architecture, shipped config "
                                                   "(safeclip-tiny-vit, safeclip-small-vit) or config .json."),
    pretrained: Optional[str] = typer.Option(None, help="Local open_clip checkpoint to start from."),
    epochs: Optional[int] = typer.Option(None, help="Total epochs including the warm-up [32]."),
    unimodal_epochs: Optional[int] = typer.Option(None, help="Phase 1 epochs [5]."),
    clip_epochs: Optional[int] = typer.Option(None, help="Phase 2 epochs (CLIP at --clip-lr-scale x lr) [1]."),
    clip_lr_scale: Optional[float] = typer.Option(None, help="LR factor of the CLIP warm-up [0.01]."),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per batch per process [128]."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate, AdamW [5e-4]."),
    weight_decay: Optional[float] = typer.Option(None, "--wd", help="AdamW weight decay [0.1]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear LR warm-up steps, per phase "
                                                          "[10% of the phase]."),
    ratio_schedule: Optional[str] = typer.Option(None, help="Split schedule, as `safeclip split`: "
                                                            "safeclip[:threshold=T,step=S,cap=C,r0=R], fraction:F, "
                                                            "threshold:T [safeclip; clip-score: fraction:0.3]."),
    ranking: str = typer.Option("global", help="Split ranking: global (the paper's) or balanced."),
    clip_views: str = typer.Option("auto", help="What the CLIP loss trains on: cross (SafeCLIP's "
                                                "cross-augmented loss on two augmented views), plain (CLIP on "
                                                "the image and caption as they are; half the work), auto "
                                                "(cross for safeclip, plain for the none/clip-score baselines, "
                                                "as in the paper)."),
    score_from_training: bool = typer.Option(False, help="Score each split from the embeddings the previous "
                                                         "epoch's training pass computed (view 1 of every pair) "
                                                         "instead of a separate no-grad pass."),
    temperature: float = typer.Option(0.1, help="Temperature of the unimodal InfoNCE loss."),
    memory_bank: Optional[int] = typer.Option(None, help="NNCLR memory bank per modality; 0 = in-batch [4096]."),
    eda_alpha: float = typer.Option(0.1, help="EDA strength for caption views."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this value."),
    local_loss: bool = typer.Option(False, help="Under torchrun: each rank's rows against all ranks' features "
                                                "(open_clip's --local-loss) instead of the full global logits."),
    fit_sample: int = typer.Option(1_000_000, help="Similarities sampled to fit the mixture."),
    keep: int = typer.Option(2, help="Epoch checkpoints to keep (newest)."),
    eval_every: int = typer.Option(0, help="Zero-shot accuracy every K split epochs (and at the end); 0 = never."),
    eval_test: Optional[str] = typer.Option(None, help="Labelled test pairs for --eval-every."),
    eval_classes: str = typer.Option("fashion-mnist", help="Class names: built-in set, file or comma list."),
    workers: int = typer.Option(1, help="DataLoader workers per stream."),
    device: str = typer.Option("auto", help="auto, cpu, cuda."),
    threads: int = typer.Option(0, help="torch CPU threads; 0 = $OMP_NUM_THREADS if set, else one per core "
                                        "not used by workers."),
    seed: int = typer.Option(0, help="Seed for model init, data order, augmentations and the mixture fit."),
    source_format: Optional[str] = typer.Option(None, "--format", help="Force the source format."),
    warmup_from: Optional[Path] = typer.Option(None, help="Take phases 1-2 from this finished warm-up "
                                                          "checkpoint (`safeclip warmup`'s output or another "
                                                          "run's RUN/warmup.pt) instead of training them; its "
                                                          "settings must match this run's."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest checkpoint "
                                            "(its saved settings are used)."),
    overwrite: bool = typer.Option(False, help="Delete an existing run folder at --out first."),
) -> None:
    """SafeCLIP pre-training end to end: unimodal + low-LR CLIP warm-up, then every epoch score all
    pairs, split them with the ratio schedule into OUT/splits/epoch=K/, and train the safe set with
    the cross-augmented CLIP loss and the risky set with the unimodal loss (batches of the two
    interleaved in proportion). Runs under torchrun (DDP; gloo on CPU, NCCL on GPU)."""
    import torch

    from sanitize.train.distributed import init
    from sanitize.stages.pretrain import PretrainConfig, apply_preset, run_pretrain
    from sanitize.stages.warmup import WarmupConfig

    given = {k: v for k, v in dict(model=model, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                   warmup_steps=warmup_steps, epochs=epochs, unimodal_epochs=unimodal_epochs,
                                   clip_epochs=clip_epochs, clip_lr_scale=clip_lr_scale,
                                   ratio_schedule=ratio_schedule, memory_bank=memory_bank).items() if v is not None}
    if threads < 0 or workers < 0:
        fail("--threads and --workers must be >= 0")
    with user_errors():
        values = apply_preset(preset, given)
    if defense == "clip-score" and "ratio_schedule" not in given:
        values["ratio_schedule"] = "fraction:0.3"
    base = WarmupConfig()
    wcfg = WarmupConfig(model=values.get("model", base.model), pretrained=pretrained,
                        unimodal_epochs=values.get("unimodal_epochs", base.unimodal_epochs),
                        clip_epochs=values.get("clip_epochs", base.clip_epochs),
                        batch_size=values.get("batch_size", base.batch_size), lr=values.get("lr", base.lr),
                        clip_lr_scale=values.get("clip_lr_scale", base.clip_lr_scale),
                        weight_decay=values.get("weight_decay", base.weight_decay),
                        warmup_steps=values.get("warmup_steps"), temperature=temperature,
                        memory_bank=values.get("memory_bank", base.memory_bank), eda_alpha=eda_alpha,
                        precision=precision, grad_clip=grad_clip, seed=seed, num_workers=workers)
    config = PretrainConfig(warmup=wcfg, epochs=values.get("epochs", 32), defense=defense,
                            ratio_schedule=values.get("ratio_schedule", "safeclip"), ranking=ranking,
                            clip_views=clip_views, score_from_training=score_from_training, fit_sample=fit_sample,
                            local_loss=local_loss,
                            keep=keep, eval_every=eval_every, eval_test=eval_test, eval_classes=eval_classes)
    if not resume:
        with user_errors():
            config.validate()
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA device is available")

    from sanitize.train.distributed import barrier, broadcast_object

    ctx = init(device)
    problem = None
    if ctx.is_main:  # rank 0 decides; every rank exits alike instead of waiting at a barrier
        if out.exists() and not out.is_dir():
            problem = f"{out} is a file; --out names a run folder"
        elif out.exists() and any(out.iterdir()) and not resume:
            if not overwrite:
                problem = f"{out} holds a run; pass --resume to continue it or --overwrite to start again"
            else:
                shutil.rmtree(out)
        elif resume and not out.exists():
            problem = f"{out}: nothing to resume (no run there yet)"
    problem = broadcast_object(ctx, problem)
    if problem:
        fail(problem)
    barrier(ctx)
    if threads == 0:
        threads = default_threads(workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


    from sanitize.stages.pretrain import Hooks

    with user_errors(), EpochBar() as bar:
        bar.progress.disable = bar.progress.disable or not ctx.is_main
        scoring: dict = {}

        def stage(description: str, total: int) -> None:
            scoring["task"] = bar.progress.add_task(description, total=total, info="no-grad pass")

        def score_batch(n: int) -> None:
            bar.progress.update(scoring["task"], advance=n)

        hooks = Hooks(warmup_epoch_start=bar.epoch_start, step=bar.step, epoch_start=bar.epoch_start,
                      stage=stage, score_batch=score_batch)
        result = run_pretrain(src, out, config, resume=resume, ctx=ctx, device=device, source_format=source_format,
                              threads=threads, hooks=hooks,
                              warmup_from=str(warmup_from) if warmup_from else None)
    if ctx.enabled:
        torch.distributed.destroy_process_group()
    if not ctx.is_main:
        return
    last = [r for r in result.epochs if r.get("stage") == "pretrain"]
    for r in last:
        for message in r.get("split_warnings", []):
            warn(f"split of epoch {r['epoch']}: {message}")
    skipped = (result.epochs[0].get("skipped") if result.epochs else None) or {}
    if skipped:
        warn("skipped pairs: " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
    tail = ""
    if last:
        r = last[-1]
        tail = f"; last epoch {r['epoch']}: {r['steps']} steps"
        if "safe_ratio" in r:
            tail += f", safe {r['safe_ratio']:.1%}"
        if "zero_shot_top1" in r:
            tail += f", zero-shot {r['zero_shot_top1']:.1%}"
        tail += f", {r['seconds']['total']:.0f} s"
    state = "done" if result.finished else "stopped"
    done(f"pretrain {state} ({config.defense}): {len(result.epochs)} epochs{tail} -> {out} "
         f"(checkpoint {result.last_checkpoint}, metrics {out / 'metrics.jsonl'})")


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
