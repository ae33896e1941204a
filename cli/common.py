"""Shared CLI conventions: one-line errors, progress bars, end-of-run summaries."""

from __future__ import annotations

import contextlib
import errno
import os
import re
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
    """Turn expected errors (bad input, bad config, a full disk) into one-line messages."""
    from sanitize.io.pairs import SourceError

    try:
        yield
    except (SourceError, ValueError) as exc:
        fail(one_line_message(exc))
    except OSError as exc:  # a full disk, a read-only folder, …: what failed and where, no traceback
        from_system = exc.errno is not None or re.search(r"\[errno \d+\]", str(exc), re.IGNORECASE)
        fail(os_error_message(exc) if from_system else one_line_message(exc))


# errno -> what it means for the user; the rest get the system's own words.
_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or the process's file size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}


def os_error_message(exc: OSError) -> str:
    """One line for an OSError, e.g. 'OUT/00003.parquet: no space left on the device; free
    some space and rerun (finished files are kept, nothing half-written is: …)'."""
    code = exc.errno
    if code is None:  # pyarrow's IOError carries the errno in its text: "[errno 28] No space left …"
        match = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
        code = int(match.group(1)) if match else None
    what = _OS_ERRORS.get(code) or exc.strerror or one_line_message(exc)
    where = f"{_final_name(str(exc.filename))}: " if exc.filename else ""
    hint = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space and rerun (finished files are kept, nothing half-written is: docs/reliability.md)"
    elif code == errno.EFBIG:
        hint = ("; write to a file system that takes larger files, or raise `ulimit -f`, and rerun (finished "
                "files are kept, nothing half-written is: docs/reliability.md)")
    return f"{where}{what}{hint}"


def _final_name(path: str) -> str:
    """The file a temporary name (.NAME.tmpPID, sanitize.io.shards.temp_path) stands for."""
    folder, name = os.path.split(path)
    match = re.fullmatch(r"\.(.+)\.tmp\d+", name)
    return os.path.join(folder, match.group(1)) if match else path


def one_line_message(exc: BaseException) -> str:
    """An exception's message on one line. An error raised in a DataLoader worker arrives
    wrapped in the worker's traceback: keep the original exception's own message."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(text.split()) or type(exc).__name__


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
