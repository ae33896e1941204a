"""`safeclip report`: one self-contained HTML page about a split."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import done, fail, user_errors, warn


HELP = "\n\n".join([
    "Write one self-contained HTML report of a split.",
    "It shows the similarity histogram with the fitted mixture components and the safe/risky cut, the counts, "
    "the most risky pairs with thumbnails read from the original source, and, where a poison manifest is "
    "found, recall and precision of the poisons in the risky set per attack.",
])


def report(
    part: Path = typer.Argument(..., help="Split folder written by `safeclip split`."),
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write."),
    top: int = typer.Option(24, "--top", min=0, help="How many of the most risky pairs to show."),
    bins: int = typer.Option(60, "--bins", min=5, max=400, help="Histogram bins."),
    thumb_px: int = typer.Option(96, "--thumb-px", min=16, max=512, help="Thumbnail size in pixels."),
    meta: str = typer.Option(None, "--meta", help="img2dataset sidecar Parquet (default: found beside the source)."),
    truth: str = typer.Option(None, "--truth", help="Poison manifest (default: manifest.parquet beside the source)."),
) -> None:
    """Write one self-contained HTML report of a split (help text: HELP)."""
    from sanitize.stages.report import build_report
    from sanitize.io.shards import atomic_write_bytes

    if out.suffix.lower() not in (".html", ".htm"):
        fail(f"{out}: the report is HTML; give a .html file name")
    with user_errors():
        page, data = build_report(part, top=top, bins=bins, thumb_px=thumb_px, meta=meta, truth=truth)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, page.encode("utf-8"))
    for note in data.notes:
        warn(note)
    thumbs = sum(p.thumbnail is not None for p in data.risky)
    c = data.manifest["counts"]
    recall = ""
    if data.detection:
        poisons = [r for r in data.detection if r["kind"] == "poison"]
        overall = next((r for r in poisons if r["name"] == "all poisons"), poisons[0] if poisons else None)
        if overall:
            recall = f"; poison recall in risky {overall['recall']:.1%}"
    done(f"report of {c['total']:,} pairs ({c['risky']:,} risky{recall}), {len(data.risky)} risky pairs shown, "
         f"{thumbs} with thumbnails -> {out} ({len(page) / 1024:.0f} KiB)")


def register(app: typer.Typer) -> None:
    app.command("report", help=HELP)(report)
