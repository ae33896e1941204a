"""`safeclip pretrain`: warm-up, then score -> split -> train every epoch, with the chosen defense."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sanitize.stages.config import PretrainConfig, WarmupConfig

from .common import EpochBar, done, fail, user_errors, warn

P, W = PretrainConfig(), WarmupConfig()  # the library's defaults, shown and passed on
# The options that are PretrainConfig/WarmupConfig fields by the same name (and --workers: num_workers).
CONFIG_OPTIONS = ("defense", "model", "pretrained", "epochs", "unimodal_epochs", "clip_epochs", "clip_lr_scale",
                  "batch_size", "lr", "weight_decay", "warmup_steps", "ratio_schedule", "ranking", "clip_views",
                  "risky_loss", "dedup_tau", "score_from_training", "temperature", "memory_bank", "eda_alpha",
                  "precision", "grad_clip", "local_loss", "fit_sample", "keep", "eval_every", "eval_test",
                  "eval_classes", "seed")
HELP = {
    "defense": "resplit (the default: warm-up, then every epoch re-split to 85% safe with near-duplicate "
               "images grouped, plain CLIP on the safe set, the risky rest left out); safeclip (the paper's "
               "loop: growing safe share from the first split, cross-augmented CLIP on the safe set and the "
               "unimodal loss on the risky set; --preset paper picks it); none (plain CLIP on every pair, no "
               "warm-up, never splits: the baseline); clip-score (warm-up, one split with a fixed "
               "fraction/threshold, CLIP on that safe set only). [resplit]",
    "clip_views": "What the CLIP loss trains on: cross (SafeCLIP's cross-augmented loss on two augmented views), "
                  "plain (CLIP on the image and caption as they are; half the work), auto (cross for safeclip, "
                  "plain for resplit and the none/clip-score baselines).",
    "score_from_training": "Score each split from the embeddings the previous epoch's training pass computed "
                           "for the pairs it trained as plain pairs, and a no-grad pass over the rest only, "
                           "instead of a no-grad pass over every pair (resplit: from the third split on).",
    "risky_loss": "What trains the risky partition: unimodal (SafeCLIP's image-only and text-only "
                  "contrastive loss), none (left out), auto (the defense's own).",
    "dedup_tau": "Near-duplicate images (centred image-embedding cosine >= TAU) keep at most one pair in the "
                 "safe set, a group of more than 4 none; 0 = off [the defense's own].",
    "warmup_from": "Take phases 1-2 from this finished warm-up checkpoint (`safeclip warmup`'s output or another "
                   "run's RUN/warmup.pt) instead of training them; its settings must match this run's.",
    "ratio_schedule": "Split schedule, as `safeclip split`: safeclip[:threshold=T,step=S,cap=C,r0=R], "
                      "fraction:F, threshold:T, estimate[:margin=M,cap=C,floor=L] [the defense's own: "
                      "fraction:0.85 for resplit, safeclip for "
                      "safeclip, fraction:0.3 for clip-score].",
}

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
    defense: Optional[str] = typer.Option(None, help=HELP["defense"]),
    model: Optional[str] = typer.Option(None, help="open_clip architecture, shipped config "
                                                   "(safeclip-tiny-vit, safeclip-small-vit) or config .json."),
    pretrained: Optional[str] = typer.Option(None, help="Local open_clip weights to start from, for "
                                                        "--model (e.g. open_clip_train's epoch_N.pt)."),
    epochs: Optional[int] = typer.Option(None, help=f"Total epochs including the warm-up [{P.epochs}]."),
    unimodal_epochs: Optional[int] = typer.Option(None, help=f"Phase 1 epochs [{W.unimodal_epochs}]."),
    clip_epochs: Optional[int] = typer.Option(None, help=f"Phase 2 epochs (CLIP at --clip-lr-scale x lr) "
                                                         f"[{W.clip_epochs}]."),
    clip_lr_scale: Optional[float] = typer.Option(None, help=f"LR factor of the CLIP warm-up [{W.clip_lr_scale}]."),
    batch_size: Optional[int] = typer.Option(None, help=f"Pairs per batch per process [{W.batch_size}]."),
    lr: Optional[float] = typer.Option(None, help=f"Base learning rate, AdamW [{W.lr}]."),
    weight_decay: Optional[float] = typer.Option(None, "--wd", help=f"AdamW weight decay [{W.weight_decay}]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear LR warm-up steps, per phase "
                                                          "[10% of the phase]."),
    ratio_schedule: Optional[str] = typer.Option(None, help=HELP["ratio_schedule"]),
    ranking: str = typer.Option(P.ranking, help="Split ranking: global (the paper's) or balanced."),
    clip_views: str = typer.Option(P.clip_views, help=HELP["clip_views"]),
    risky_loss: str = typer.Option(P.risky_loss, help=HELP["risky_loss"]),
    dedup_tau: Optional[float] = typer.Option(None, help=HELP["dedup_tau"]),
    score_from_training: Optional[bool] = typer.Option(None, "--score-from-training/--score-separately",
                                                     help=HELP["score_from_training"]),
    temperature: float = typer.Option(W.temperature, help="Temperature of the unimodal InfoNCE loss."),
    memory_bank: Optional[int] = typer.Option(None, help=f"NNCLR memory bank per modality; 0 = in-batch "
                                                         f"[{W.memory_bank}]."),
    eda_alpha: float = typer.Option(W.eda_alpha, help="EDA strength for caption views."),
    precision: str = typer.Option(W.precision, help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this value."),
    local_loss: bool = typer.Option(False, help="Under torchrun: each rank's rows against all ranks' features "
                                                "(open_clip's --local-loss) instead of the full global logits."),
    fit_sample: int = typer.Option(P.fit_sample, help="Similarities sampled to fit the mixture."),
    keep: int = typer.Option(P.keep, help="Epoch checkpoints to keep (newest)."),
    eval_every: int = typer.Option(P.eval_every, help="Zero-shot accuracy every K split epochs (and at the "
                                                      "end); 0 = never."),
    eval_test: Optional[str] = typer.Option(None, help="Labelled test pairs for --eval-every."),
    eval_classes: str = typer.Option(P.eval_classes, help="Class names: built-in set, file or comma list."),
    # 1, not the library's 0: a worker process decodes and augments while this one trains
    workers: int = typer.Option(1, help="DataLoader workers per stream."),
    device: str = typer.Option("auto", help="auto, cpu, cuda."),
    threads: int = typer.Option(0, help="torch CPU threads; 0 = $OMP_NUM_THREADS if set, else one per core "
                                        "not used by workers."),
    seed: int = typer.Option(W.seed, help="Seed for model init, data order, augmentations and the mixture fit."),
    source_format: Optional[str] = typer.Option(None, "--format", help="Force the source format."),
    warmup_from: Optional[Path] = typer.Option(None, help=HELP["warmup_from"]),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest checkpoint "
                                            "(its saved settings are used)."),
    overwrite: bool = typer.Option(False, help="Delete an existing run folder at --out first."),
) -> None:
    """Defended CLIP training: warm-up, then split and train every epoch.

    Unimodal + low-LR CLIP warm-up, then every epoch score all pairs, split them into
    OUT/splits/epoch=K/ and train. The default defense (resplit) keeps the 85% most similar
    pairs as the safe set (at most one pair per near-duplicate image group) and trains plain
    CLIP on it alone; --defense safeclip (or --preset paper) runs the paper's loop: a safe
    share growing from the first split, cross-augmented CLIP on it and the unimodal loss on
    the risky set.
    Each split's mixture, separation and warnings go into OUT/metrics.jsonl; the summary
    repeats the warnings. Runs under torchrun (DDP; gloo on CPU, NCCL on GPU).
    """
    from sanitize.stages.pretrain import Hooks, prepare_run_folder, run_pretrain
    from sanitize.train import distributed

    options = {name: value for name, value in locals().items() if name in CONFIG_OPTIONS}
    with user_errors():
        config = PretrainConfig.from_options(preset, num_workers=workers, **options)
        if threads < 0:
            fail("--threads must be >= 0")
        if not resume:
            config.validate()
        distributed.resolve_device(device)  # no CUDA, or a bogus name: one line before any work
        with distributed.session(device) as ctx:
            prepare_run_folder(out, resume=resume, overwrite=overwrite, ctx=ctx)
            with EpochBar(enabled=ctx.is_main) as bar:
                hooks = Hooks(warmup_epoch_start=bar.epoch_start, step=bar.step, epoch_start=bar.epoch_start,
                              stage=bar.stage, score_batch=bar.advance_stage)
                result = run_pretrain(src, out, config, resume=resume, ctx=ctx, device=device,
                                      source_format=source_format, threads=threads, hooks=hooks,
                                      warmup_from=str(warmup_from) if warmup_from else None)
            if not ctx.is_main:
                return
    _summary(result, out)


def _summary(result, out: Path) -> None:
    from sanitize.io.artifacts import Run

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
    defense = last[-1]["phase"] if last else "warm-up"
    done(f"pretrain {state} ({defense}): {len(result.epochs)} epochs{tail} -> {out} "
         f"(checkpoint {result.last_checkpoint}, metrics {Run(out).metrics})")


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
