"""`safeclip data ...`: build datasets to experiment with (captioned Fashion-MNIST)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import done, progress, user_errors


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Build datasets to experiment with.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("fashion-mnist")
    def fashion_mnist(
        out: Path = typer.Option(..., "--out", help="Output folder; gets train/, test/ and _stats.json."),
        source: Optional[Path] = typer.Option(
            None, "--source", help="Folder of the idx files (default: Debian's dataset-fashion-mnist)."),
        noise: float = typer.Option(0.03, "--noise", help="Share of train captions swapped for the caption "
                                    "of a random pair of another class (marked noise=true); test captions "
                                    "stay truthful."),
        seed: int = typer.Option(0, "--seed", help="Seed for captions, noise and subsets."),
        train_size: Optional[int] = typer.Option(None, "--train-size", help="Class-balanced train subset."),
        test_size: Optional[int] = typer.Option(None, "--test-size", help="Class-balanced test subset."),
        samples_per_shard: int = typer.Option(10000, "--samples-per-shard"),
    ) -> None:
        """Captioned Fashion-MNIST as webdataset shards (img2dataset layout).

        Captions come from a seeded generator (varied templates, class synonyms);
        train keys are the Fashion-MNIST index (000001234), test keys are prefixed
        (test-000001234). Metadata keeps the true class (label, class_name).
        """
        from sanitize.io.fashion_mnist import build

        with user_errors():
            stats = build(out, source, noise=noise, seed=seed, train_size=train_size, test_size=test_size,
                          samples_per_shard=samples_per_shard,
                          wrap=lambda pairs, total, split: progress(pairs, total, f"writing {split}"))
        train, test = stats["splits"]["train"], stats["splits"]["test"]
        fewest = min(train["distinct_captions_per_class"].values())
        done(f"wrote {train['pairs']:,} train + {test['pairs']:,} test pairs to {out} "
             f"({train['noise_pairs']:,} noisy train captions; >= {fewest} distinct captions per class)")
