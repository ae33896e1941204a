"""`safeclip download`: a thin wrapper over `img2dataset.download`.

img2dataset does all the work (fetching, resizing, sharding, resuming); this
module only picks defaults that suit CLIP pre-training data, checks the URL list
up front so a typo costs a one-line message instead of a worker traceback, and
reads the result back with our own reader so the user learns how many pairs are
actually usable.

Two files are added beside img2dataset's shards, neither named `*.json` at the
top level, because img2dataset parses every top-level `*.json` name as a shard
number when it resumes:
  `__len__`                        pair count, which open_clip's trainer reads
                                   when the folder has no sizes.json
  `_safeclip/download_stats.json`  the run's options, img2dataset's totals and
                                   our read-back counts
"""

from __future__ import annotations

import ast
import csv
import glob
import gzip
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .pairs import SHARD_STATS_SUFFIX, Pair, SourceError, open_pairs
from .shards import atomic_write_bytes, atomic_write_json

INPUT_FORMATS = ("txt", "csv", "tsv", "parquet", "json", "jsonl")
OUTPUT_FORMATS = ("webdataset", "parquet")
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")
STATS_PATH = os.path.join("_safeclip", "download_stats.json")
INSTALL_HINT = "img2dataset is not installed; install it with: pip install 'safeclip[download]'"


class DownloadError(Exception):
    """img2dataset missing or failing as a whole; the message is one line."""


@dataclass
class DownloadOptions:
    """The img2dataset settings users need most. Defaults: webdataset output (what
    open_clip and our readers consume), 256 px on the short side with the aspect
    ratio kept and no upscaling (open_clip crops at training time, so no black
    borders are baked in), no wandb."""

    input_format: str | None = None  # None: from the URL list's extension
    url_col: str = "url"
    caption_col: str | None = None  # None: "caption" when the list has that column
    output_format: str = "webdataset"
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    processes: int = 1
    threads: int = 16
    samples_per_shard: int = 10000
    timeout: int = 10
    retries: int = 0
    extra: dict = field(default_factory=dict)  # any other img2dataset.download argument


def infer_input_format(url_list: str) -> str:
    """txt/csv/tsv/parquet/json/jsonl from the file name (a `.gz` suffix is kept, as
    img2dataset expects); for a folder, from the one list format found inside."""
    if os.path.isdir(url_list):
        found = sorted({fmt for name in os.listdir(url_list) for fmt in _formats_of(name)})
        if len(found) != 1:
            what = ", ".join(found) if found else "no URL list files"
            raise SourceError(f"{url_list}: cannot tell the URL list format ({what}); set --input-format")
        return found[0]
    formats = _formats_of(os.path.basename(url_list))
    if not formats:
        raise SourceError(f"{url_list}: cannot tell the URL list format from its name; "
                          f"set --input-format ({', '.join(INPUT_FORMATS)})")
    return formats[0]


def _formats_of(name: str) -> list[str]:
    lower = name.lower()
    gz = lower.endswith(".gz")
    stem = lower[:-3] if gz else lower
    for fmt in INPUT_FORMATS:
        if stem.endswith("." + fmt) and not (gz and fmt == "parquet"):
            return [fmt + (".gz" if gz else "")]
    return []


def list_columns(path: str, input_format: str) -> list[str] | None:
    """Column names of a URL list file, or None when the format has none to check."""
    base = input_format.removesuffix(".gz")
    if base in ("csv", "tsv"):
        opener = gzip.open if input_format.endswith(".gz") else open
        with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as f:
            return next(csv.reader(f, delimiter="\t" if base == "tsv" else ","), [])
    if base == "jsonl":
        opener = gzip.open if input_format.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            first = f.readline()
        try:
            record = json.loads(first)
        except ValueError:
            raise SourceError(f"{path}: first line is not a JSON object")
        return list(record) if isinstance(record, dict) else None
    if base == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # pyarrow's errors for a non-parquet file vary
            raise SourceError(f"{path}: not a readable parquet file ({exc})")
    return None


def resolve_options(url_list: str, options: DownloadOptions) -> DownloadOptions:
    """Check the URL list and fill in detected settings; SourceError on bad input."""
    if not os.path.exists(url_list):
        raise SourceError(f"{url_list}: no such file or folder")
    fmt = options.input_format or infer_input_format(url_list)
    if fmt.removesuffix(".gz") not in INPUT_FORMATS:
        raise SourceError(f"unknown input format {fmt!r}; choose one of {', '.join(INPUT_FORMATS)}")
    for name, value, choices in (("output format", options.output_format, OUTPUT_FORMATS),
                                 ("resize mode", options.resize_mode, RESIZE_MODES),
                                 ("encode format", options.encode_format, ENCODE_FORMATS)):
        if value not in choices:
            raise SourceError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    if options.image_size < 1 or options.processes < 1 or options.threads < 1 or options.samples_per_shard < 1:
        raise SourceError("--image-size, --processes, --threads and --samples-per-shard must be >= 1")
    if options.timeout < 1 or options.retries < 0:
        raise SourceError("--timeout must be >= 1 and --retries >= 0")
    files = ([url_list] if os.path.isfile(url_list)
             else sorted(glob.glob(os.path.join(glob.escape(url_list), "*." + fmt))))
    if not files:
        raise SourceError(f"{url_list}: no *.{fmt} URL list files in this folder")
    caption_col = options.caption_col
    columns = list_columns(files[0], fmt)
    if columns is not None:
        wanted = [options.url_col] + ([caption_col] if caption_col else [])
        missing = [c for c in wanted if c not in columns]
        if missing:
            shown = ", ".join(repr(c) for c in columns[:10]) or "nothing"
            raise SourceError(f"{files[0]}: missing column(s) {', '.join(missing)}; header has {shown} "
                              f"(set --url-col / --caption-col)")
        if caption_col is None and "caption" in columns:
            caption_col = "caption"
    resolved = DownloadOptions(**{**asdict(options), "input_format": fmt, "caption_col": caption_col})
    return resolved


def img2dataset_arguments(url_list: str, out_dir: str, options: DownloadOptions) -> dict:
    """The keyword arguments for `img2dataset.download`."""
    args = dict(url_list=url_list, output_folder=out_dir, input_format=options.input_format,
                url_col=options.url_col, caption_col=options.caption_col,
                output_format=options.output_format, image_size=options.image_size,
                resize_mode=options.resize_mode, resize_only_if_bigger=options.resize_only_if_bigger,
                encode_format=options.encode_format, processes_count=options.processes,
                thread_count=options.threads, number_sample_per_shard=options.samples_per_shard,
                timeout=options.timeout, retries=options.retries, enable_wandb=False)
    if options.encode_format == "png":
        args["encode_quality"] = 6  # for png img2dataset reads it as the zlib level (0-9); its 95 is refused
    args.update(options.extra)
    return args


def parse_extra(items: Iterable[str]) -> dict:
    """`KEY=VALUE` strings to img2dataset keyword arguments; values are Python
    literals when they parse as one (64, True, None, ['a']), else strings."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SourceError(f"--extra {item!r}: expected KEY=VALUE")
        try:
            extra[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key.strip()] = value
    return extra


def _img2dataset_download() -> Callable[..., None]:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it phones home on import otherwise
    try:
        from img2dataset import download
    except ImportError as exc:
        raise DownloadError(INSTALL_HINT) from exc
    return download


def img2dataset_totals(out_dir: str) -> dict:
    """Sum img2dataset's per-shard `NNNNN_stats.json` files."""
    totals = {"shards": 0, "count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    errors: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "*" + SHARD_STATS_SUFFIX))):
        try:
            with open(path) as f:
                stats = json.load(f)
        except (OSError, ValueError):
            continue
        totals["shards"] += 1
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(stats.get(k) or 0)
        for status, n in (stats.get("status_dict") or {}).items():
            if status != "success":
                errors[status] = errors.get(status, 0) + int(n)
    totals["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
    return totals


@dataclass
class DownloadResult:
    out_dir: str
    options: DownloadOptions
    totals: dict
    readable: int
    skips: dict

    def as_dict(self) -> dict:
        return {"out_dir": self.out_dir, "options": asdict(self.options), "img2dataset": self.totals,
                "readable_pairs": self.readable, "read_skips": self.skips}


def download(url_list: str, out_dir: str, options: DownloadOptions | None = None,
             wrap: Callable[[Iterator[Pair], int | None], Iterable[Pair]] | None = None,
             downloader: Callable[..., None] | None = None) -> DownloadResult:
    """Run img2dataset, then read its output back and write the summary files.
    `wrap(pairs, total)` may add a progress bar to the read-back; `downloader`
    replaces `img2dataset.download` (tests)."""
    options = resolve_options(str(url_list), options or DownloadOptions())
    run = downloader or _img2dataset_download()
    os.makedirs(out_dir, exist_ok=True)
    try:
        run(**img2dataset_arguments(str(url_list), str(out_dir), options))
    except (KeyboardInterrupt, DownloadError):
        raise
    except Exception as exc:  # img2dataset's own failures surface as one line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DownloadError(f"img2dataset failed: {type(exc).__name__}: {message}") from exc
    return summarize(str(out_dir), options, wrap)


def summarize(out_dir: str, options: DownloadOptions,
              wrap: Callable[[Iterator[Pair], int | None], Iterable[Pair]] | None = None) -> DownloadResult:
    """Read the downloaded shards with our reader and write `__len__` and the stats."""
    totals = img2dataset_totals(out_dir)
    readable = 0
    skips: dict = {"total": 0, "by_reason": {}, "examples": {}}
    try:
        source = open_pairs(out_dir, format=options.output_format)
    except SourceError:
        source = None  # nothing downloaded at all: reported through the totals
    if source is not None:
        pairs: Iterable[Pair] = iter(source)
        if wrap is not None:
            pairs = wrap(pairs, source.count_hint())
        for _ in pairs:
            readable += 1
        skips = source.skips.as_dict()
    result = DownloadResult(out_dir, options, totals, readable, skips)
    if options.output_format == "webdataset":
        atomic_write_bytes(Path(out_dir) / "__len__", f"{readable}\n".encode())
    (Path(out_dir) / STATS_PATH).parent.mkdir(exist_ok=True)
    atomic_write_json(Path(out_dir) / STATS_PATH, result.as_dict())
    return result
