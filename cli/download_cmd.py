"""`safeclip download URL_LIST --out DIR`: img2dataset with safeclip's defaults."""

from __future__ import annotations

from typing import List, Optional

import typer

from .common import done, fail, progress, user_errors, warn


def register(app: typer.Typer) -> None:
    app.command("download")(download)


def download(
    url_list: str = typer.Argument(..., help="URL list: a .txt/.csv/.tsv/.parquet/.json(l) file (optionally .gz), "
                                             "or a folder of them."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (img2dataset shards). A rerun resumes."),
    input_format: Optional[str] = typer.Option(None, help="txt, csv, tsv, parquet, json or jsonl "
                                                          "(default: from the file name)."),
    url_col: str = typer.Option("url", help="Column holding the URLs."),
    caption_col: Optional[str] = typer.Option(None, help="Column holding captions "
                                                         "(default: 'caption' when the list has one)."),
    output_format: str = typer.Option("webdataset", help="webdataset or parquet."),
    image_size: int = typer.Option(256, help="Target size in pixels (see --resize-mode)."),
    resize_mode: str = typer.Option("keep_ratio", help="img2dataset resize mode: keep_ratio (short side = size), "
                                                       "keep_ratio_largest, center_crop, border or no."),
    upscale: bool = typer.Option(False, "--upscale/--no-upscale",
                                 help="Also enlarge images smaller than --image-size."),
    encode_format: str = typer.Option("jpg", help="jpg, png or webp."),
    processes: int = typer.Option(1, help="Download processes."),
    threads: int = typer.Option(16, help="Download threads per process."),
    samples_per_shard: int = typer.Option(10000, help="Pairs per shard."),
    timeout: int = typer.Option(10, help="Seconds to wait for each URL."),
    retries: int = typer.Option(0, help="Retries per failed URL."),
    extra: List[str] = typer.Option([], "--extra", help="Any other img2dataset.download argument as KEY=VALUE "
                                                        "(repeatable), e.g. --extra min_image_size=64."),
) -> None:
    """Download pairs with img2dataset and check they read back.

    img2dataset does the downloading (pip install 'safeclip[download]'); safeclip then reads
    every shard back and reports readable pairs and skips by reason.
    """
    from sanitize.io.download import (DownloadError, DownloadOptions, STATS_PATH, download as run_download,
                                   parse_extra, resolve_options)

    with user_errors():
        options = DownloadOptions(
            input_format=input_format, url_col=url_col, caption_col=caption_col, output_format=output_format,
            image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=not upscale,
            encode_format=encode_format, processes=processes, threads=threads,
            samples_per_shard=samples_per_shard, timeout=timeout, retries=retries, extra=parse_extra(extra))
        options = resolve_options(url_list, options)  # bad lists fail here, before anything starts
        if options.caption_col is None:
            warn("no caption column: images will be downloaded without captions, so they will not be pairs "
                 "(set --caption-col)")
        try:
            result = run_download(url_list, out, options,
                                  wrap=lambda pairs, total: progress(pairs, total, "reading back"))
        except DownloadError as exc:
            fail(str(exc))
    totals, skips = result.totals, result.skips
    failed = totals["count"] - totals["successes"]
    why = ", ".join(f"{n} {status}" for status, n in list(totals["errors"].items())[:3])
    done(f"downloaded {totals['successes']} of {totals['count']} URLs"
         + (f" ({failed} failed: {why})" if failed else "")
         + f"; {result.readable} pairs readable, {skips['total']} skipped"
         + (f" ({', '.join(f'{n} {r}' for r, n in skips['by_reason'].items())})" if skips["total"] else "")
         + f" -> {out} (stats: {STATS_PATH})")
