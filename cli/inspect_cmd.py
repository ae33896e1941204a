"""`safeclip inspect SRC`: what a pair source holds, as safeclip reads it."""

from __future__ import annotations

import json
from typing import Optional

import typer

from .common import done, out_console, progress, user_errors


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)


def inspect(
    source: str = typer.Argument(..., help="Pairs: img2dataset webdataset/parquet folder, .tar files or a brace "
                                           "pattern, a CSV/TSV, or a folder of images with .txt captions."),
    format: Optional[str] = typer.Option(None, "--format", help="Force a format: webdataset, parquet, csv, folder."),
    image_column: str = typer.Option("filepath", help="CSV/TSV: image path column."),
    caption_column: str = typer.Option("title", help="CSV/TSV: caption column."),
    separator: Optional[str] = typer.Option(None, help="CSV/TSV: separator (default: tab, or ',' for a "
                                                       ".csv whose header has no tab)."),
    show: int = typer.Option(3, min=0, help="How many pairs to print."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead."),
) -> None:
    """Show what safeclip reads from a source.

    Detects the format, counts the shards and readable pairs, lists skipped pairs by reason and
    shows the first pairs.
    """
    from sanitize.io.pairs import CsvOptions, open_pairs

    with user_errors():
        src = open_pairs(source, format=format,
                         csv_options=CsvOptions(image_column, caption_column, separator))
        first = []
        count = 0
        for pair in progress(src, src.count_hint(), "reading"):
            if len(first) < show:
                first.append({"key": pair.key, "caption": pair.caption,
                              "image": f"{pair.image.width}x{pair.image.height} {pair.image_ext}",
                              "meta": sorted(pair.meta)})
            count += 1
    summary = {"format": src.format, "shards": len(src.shards), "pairs": count, "skips": src.skips.as_dict(),
               "first": first}
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for item in first:
        out_console.print(f"{item['key']}  {item['image']}  {item['caption']!r}  meta: {', '.join(item['meta'])}",
                          highlight=False, soft_wrap=True, markup=False)
    done(f"{source}: {src.format}, {len(src.shards)} shard(s), {count} pairs readable; {src.skips.summary()}")
