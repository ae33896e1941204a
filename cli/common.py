"""Shared CLI conventions: one-line errors, progress bars, end-of-run summaries."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape  # messages carry paths and hints like 'safeclip[download]', not markup
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

T = TypeVar("T")
err_console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print a one-line error (no traceback) and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def done(message: str) -> None:
    """The one-line summary every command ends with."""
    out_console.print(message, highlight=False, soft_wrap=True, markup=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected errors (bad input, bad config) into one-line messages."""
    from sanitize.io.pairs import SourceError

    try:
        yield
    except (SourceError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as exc:
        fail(str(exc))


def progress(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """A rich progress bar on stderr; quiet when stderr is not a terminal."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, disable=not sys.stderr.isatty(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


@contextlib.contextmanager
def progress_counter(total: int | None, description: str, unit: str = "pairs",
                     enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar driven by callbacks: `with progress_counter(n, "embed") as advance: advance(k)`.
    Shows the rate in `unit`/s; quiet when stderr is not a terminal."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[rate]}")]
    with Progress(*columns, console=err_console, disable=not (enabled and sys.stderr.isatty())) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            bar.advance(task, n)
            elapsed = bar.tasks[0].elapsed or 0.0
            if elapsed > 0:
                bar.update(task, rate=f"{bar.tasks[0].completed / elapsed:,.0f} {unit}/s")

        yield advance


class EpochBar:
    """Training progress: one bar per epoch with the running loss, pairs/s and lr (warmup, pretrain)."""

    def __init__(self, enabled: bool = True) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=err_console, disable=not (enabled and sys.stderr.isatty()))
        self.task = None
        self.stage_task = None
        self.pairs = 0
        self.started = 0.0
        self.loss = None

    def __enter__(self) -> "EpochBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def epoch_start(self, phase: str, epoch: int, batches: int) -> None:
        if self.task is not None:
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch + 1} {phase}", total=batches, info="")
        self.pairs, self.started, self.loss = 0, time.perf_counter(), None

    def step(self, pairs: int, losses: dict, lr: float) -> None:
        loss = sum(losses.values())
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        self.pairs += pairs
        rate = self.pairs / max(1e-9, time.perf_counter() - self.started)
        self.progress.update(self.task, advance=1, info=f"loss {self.loss:.3f}  {rate:,.0f} pairs/s  lr {lr:.2e}")

    def stage(self, description: str, total: int) -> None:
        """A bar for work between epochs (pretrain's scoring pass), advanced by `advance_stage`."""
        self.stage_task = self.progress.add_task(description, total=total, info="no-grad pass")

    def advance_stage(self, n: int) -> None:
        if self.stage_task is not None:
            self.progress.update(self.stage_task, advance=n)
