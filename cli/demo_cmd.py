"""`safeclip demo`: poison the bundled sample, warm up, embed, split, and summarise."""

from __future__ import annotations

from pathlib import Path

import typer

from sanitize.stages.config import DemoConfig

from .common import done, err_console, out_console, user_errors, warn


DEFAULTS = DemoConfig()


def demo(
    out: Path = typer.Option(Path(DEFAULTS.out), "--out", "-o", help="Folder for every output of the run."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed for poisons, training and the split."),
    unimodal_epochs: int = typer.Option(DEFAULTS.unimodal_epochs, help="Unimodal warm-up epochs."),
    clip_epochs: int = typer.Option(DEFAULTS.clip_epochs, help="CLIP warm-up epochs."),
    clip_lr_scale: float = typer.Option(DEFAULTS.clip_lr_scale, help="CLIP warm-up learning rate as a "
                                                                     "factor of the base rate."),
    ratio_schedule: str = typer.Option(DEFAULTS.schedule, "--ratio-schedule", "-r",
                                       help="How many pairs the split makes safe (see `safeclip split "
                                            "--help`; safeclip = the paper's first-split rule)."),
    dedup_tau: float = typer.Option(DEFAULTS.dedup_tau, help="Near-duplicate images (centred image-embedding "
                                                             "cosine >= TAU) keep at most one pair in the safe "
                                                             "set (a group of more than 4 none), as pretrain's "
                                                             "default defense; 0 = off."),
    workers: int = typer.Option(DEFAULTS.workers, help="DataLoader workers for embedding."),
    threads: int = typer.Option(0, help="torch threads for the warm-up; 0 = one per core but one. The "
                                        "numbers depend a little on it (floating-point order)."),
) -> None:
    """Run the whole pipeline on a poisoned sample, in a few minutes.

    Takes the bundled Fashion-MNIST sample (5,000 pairs), injects a BadNet backdoor (50 pairs)
    and targeted poisons (4 test images x 25 copies), warms up the shipped small model, embeds
    every pair, splits them into safe and risky and reports how many injected poisons landed in
    each set, and how far the safe set could grow before the first one, as this run measured it.
    """
    from sanitize.stages.demo import run_demo

    config = DemoConfig(out=str(out), seed=seed, unimodal_epochs=unimodal_epochs, clip_epochs=clip_epochs,
                        clip_lr_scale=clip_lr_scale, schedule=ratio_schedule, dedup_tau=dedup_tau,
                        workers=workers,
                        threads=threads or None)
    stages = {"poison": "injecting BadNet + targeted poisons", "warmup": "warming up the small model",
              "embed": "embedding every pair", "split": "splitting safe / risky", "report": "writing the report"}
    with user_errors():
        summary = run_demo(config, on_stage=lambda s: err_console.print(f"[bold]»[/] {stages[s]}"), force=force)

    p = out_console.print
    p("")
    for message in summary.warnings:
        warn(message)
    p(f"[bold]{summary.pairs:,} pairs[/] split by {summary.schedule}: [bold]{summary.safe:,} safe "
      f"({summary.safe_share:.1%}) holding {summary.poisons_in_safe} of {summary.poisons} poisons[/], "
      f"{summary.risky:,} risky")
    for row in summary.recall:
        what = "mismatched captions (natural noise)" if row["attack"] == "noise" else f"{row['attack']} poisons"
        p(f"  {row['risky']:>4} of {row['poisons']:>4} {what} in the risky set (recall {row['recall']:.1%})")
    if summary.first_poison_rank is not None:
        headroom = summary.poison_free_share - summary.safe_share
        p(f"  the cleanest-looking poison ranks {summary.first_poison_rank:,} of {summary.pairs:,}: a safe set "
          f"of up to {summary.poison_free_share:.1%} would still hold no poison (headroom "
          f"{100 * headroom:+.1f} points over this split)")
    if summary.separation:
        q = summary.separation
        p(f"  mixture: Bhattacharyya coefficient {q['bhattacharyya']:.2f}, Ashman's D {q['ashman_d']:.2f}, "
          f"{q['overlap']:.1%} of pairs on the wrong side by the fit's own account")
    p("five most risky pairs (DuckDB: SELECT caption FROM risky ORDER BY rank DESC LIMIT 5):")
    for row in summary.most_risky:
        tag = f" [{row['attack']}]" if row["attack"] else ""
        p(f"  sim {row['similarity']:+.3f}  {row['caption']}{tag}", highlight=False, markup=False)
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in summary.seconds.items())
    p(f"stages: {timing}")
    p(f"outputs in {summary.out}/: data/poisoned (+ manifest.parquet), warmup.pt, embeddings/, split/",
      markup=False)
    p(f"report:  {summary.report}", markup=False)
    p(f"detection: safeclip eval --split {summary.out}/split", markup=False)
    p(f"query:   safeclip query {summary.out}/split \"SELECT attack, partition, count(*) FROM pairs "
      f"JOIN truth USING (key) GROUP BY ALL ORDER BY ALL\"", markup=False)
    done(f"demo finished in {sum(summary.seconds.values()):.0f}s")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
