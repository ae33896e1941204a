"""`safeclip demo`: poison the bundled sample, warm up, embed, split, and summarise."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import done, err_console, out_console, user_errors


def demo(
    out: Path = typer.Option(Path("safeclip-demo"), "--out", "-o", help="Folder for every output of the run."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    seed: int = typer.Option(0, help="Seed for poisons, training and the split."),
    unimodal_epochs: int = typer.Option(1, help="Unimodal warm-up epochs."),
    clip_epochs: int = typer.Option(2, help="CLIP warm-up epochs (at the base LR on this small sample)."),
    workers: int = typer.Option(2, help="DataLoader workers for embedding."),
) -> None:
    """Run the whole pipeline on the bundled Fashion-MNIST sample (5,000 pairs) in a few minutes.

    Injects a BadNet backdoor (50 pairs) and targeted poisons (4 test images x 25 copies), warms up
    the shipped small model, embeds every pair, splits safe/risky with SafeCLIP's rule and reports
    how many injected poisons landed in the risky set, as this run measured it.
    """
    from sanitize.stages.demo import DemoConfig, run_demo

    config = DemoConfig(out=str(out), seed=seed, unimodal_epochs=unimodal_epochs, clip_epochs=clip_epochs,
                        workers=workers)
    stages = {"poison": "injecting BadNet + targeted poisons", "warmup": "warming up the small model",
              "embed": "embedding every pair", "split": "splitting safe / risky", "report": "writing the report"}
    with user_errors():
        summary = run_demo(config, on_stage=lambda s: err_console.print(f"[bold]»[/] {stages[s]}"), force=force)

    p = out_console.print
    p("")
    p(f"[bold]{summary.pairs:,} pairs[/], {summary.risky:,} flagged risky "
      f"({summary.risky / summary.pairs:.1%}) by the first SafeCLIP split")
    for row in summary.recall:
        what = "mismatched captions (natural noise)" if row["attack"] == "noise" else f"{row['attack']} poisons"
        p(f"  {row['risky']:>4} of {row['poisons']:>4} {what} in the risky set (recall {row['recall']:.1%})")
    if summary.first_poison_rank is not None:
        p(f"  the cleanest-looking poison ranks {summary.first_poison_rank:,} of {summary.pairs:,}: a safe set "
          f"of up to {summary.first_poison_rank / summary.pairs:.1%} would still hold no poison "
          f"(SafeCLIP starts small and grows the safe set 1 point per epoch)")
    p("five most risky pairs (DuckDB: SELECT caption FROM risky ORDER BY rank DESC LIMIT 5):")
    for row in summary.most_risky:
        tag = f" [{row['attack']}]" if row["attack"] else ""
        p(f"  sim {row['similarity']:+.3f}  {row['caption']}{tag}", highlight=False, markup=False)
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in summary.seconds.items())
    p(f"stages: {timing}")
    p(f"outputs in {summary.out}/: data/poisoned (+ manifest.parquet), warmup.pt, embeddings/, split/",
      markup=False)
    p(f"report:  {summary.report}", markup=False)
    p(f"query:   safeclip query {summary.out}/split \"SELECT attack, partition, count(*) FROM pairs "
      f"JOIN truth USING (key) GROUP BY ALL ORDER BY ALL\"", markup=False)
    done(f"demo finished in {sum(summary.seconds.values()):.0f}s")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
