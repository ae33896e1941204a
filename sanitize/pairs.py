"""Reading image–caption pairs from every source safeclip accepts, as they come.

`open_pairs(path)` detects the format and returns a `PairSource`: a list of
shards, each iterable as `Pair`s with a stable `key`. Per-pair problems (an
unreadable image, an empty caption, …) are skipped and counted in
`source.skips` with their reason, never dropped silently; problems with the
source as a whole raise `SourceError` with a one-line message.

Formats:
  webdataset  img2dataset's webdataset output: NNNNN.tar with {key}.jpg|png|webp,
              {key}.txt, {key}.json (a folder, a brace pattern, or .tar paths)
  parquet     img2dataset's parquet output: image bytes in column `jpg`
  csv         a CSV/TSV with an image-path column and a caption column
  folder      images with same-named .txt captions
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FORMATS = ("webdataset", "parquet", "csv", "folder")


class SourceError(Exception):
    """A source that cannot be read at all (missing, unknown format, missing column)."""


@dataclass
class Pair:
    """One image–caption pair. `image_bytes`/`image_ext` keep the original encoding
    so copies (poison, export) are lossless; `image` is decoded once, on read."""

    key: str
    caption: str
    image: Image.Image
    image_bytes: bytes
    image_ext: str
    meta: dict = field(default_factory=dict)


@dataclass
class Skips:
    """Counted per-pair skips: reason -> count, plus a few example keys per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no pairs skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason][:2])})"
                 for reason, n in self.counts.most_common()]
        return f"skipped {self.total} pairs: " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


def decode_image(data: bytes) -> Image.Image:
    """Decode fully (not lazily) so truncated files fail here, not later in a worker."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_caption(data: bytes) -> str:
    return data.decode("utf-8").strip()


@dataclass
class Shard:
    """One unit of reading (a tar, a parquet file, a CSV, a folder). Iterating it
    yields pairs; `count_hint` is the expected pair count when cheaply known."""

    name: str
    path: str
    read: Callable[["Shard", Skips], Iterator[Pair]]
    count_hint: int | None = None

    def pairs(self, skips: Skips) -> Iterator[Pair]:
        return self.read(self, skips)


@dataclass
class PairSource:
    format: str
    root: str
    shards: list[Shard]
    skips: Skips = field(default_factory=Skips)

    def __iter__(self) -> Iterator[Pair]:
        for shard in self.shards:
            yield from shard.pairs(self.skips)

    def count_hint(self) -> int | None:
        hints = [s.count_hint for s in self.shards]
        return None if any(h is None for h in hints) else sum(hints)


def _make_pair(key: str, caption_bytes: bytes | None, image_bytes: bytes | None, image_ext: str | None,
               meta: dict, skips: Skips, where: str) -> Pair | None:
    """Validate and decode one pair; count and return None when it must be skipped."""
    if image_bytes is None:
        skips.add("missing image", where)
        return None
    if caption_bytes is None:
        skips.add("missing caption", where)
        return None
    try:
        caption = decode_caption(caption_bytes)
    except UnicodeDecodeError:
        skips.add("non-UTF-8 caption", where)
        return None
    if not caption:
        skips.add("empty caption", where)
        return None
    try:
        image = decode_image(image_bytes)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        skips.add("unreadable image", where)
        return None
    return Pair(key=key, caption=caption, image=image, image_bytes=image_bytes,
                image_ext=image_ext or (image.format or "png").lower(), meta=meta)


# ---- webdataset ------------------------------------------------------------------

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's key/extension split


def _read_tar(shard: Shard, skips: Skips) -> Iterator[Pair]:
    groups: dict[str, dict[str, bytes]] = {}
    truncated = False
    try:
        with tarfile.open(shard.path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _MEMBER.match(member.name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        truncated = True
    if truncated:
        # The tail of a truncated tar is lost; what was read before it is kept.
        skips.add("truncated tar (rest of shard unreadable)", shard.name)
    # img2dataset writes members unsorted; its keys are zero-padded, so sorting
    # restores the shard's index order and makes reading deterministic.
    for key in sorted(groups):
        members = groups[key]
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        meta: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skips.add("unreadable json metadata (pair kept)", f"{shard.name}:{key}")
        if truncated and (image_ext is None or "txt" not in members):
            skips.add("truncated tar (pair cut off)", f"{shard.name}:{key}")
            continue
        pair = _make_pair(key, members.get("txt"), members.get(image_ext) if image_ext else None,
                          image_ext, meta, skips, f"{shard.name}:{key}")
        if pair is not None:
            yield pair


def _stats_count(tar_path: str) -> int | None:
    stats = tar_path[: -len(".tar")] + "_stats.json"
    try:
        with open(stats) as f:
            return int(json.load(f)["successes"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset/open_clip brace patterns like DIR/{00000..00009}.tar."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        out = []
        for i in range(int(lo), int(hi) + 1):
            out += expand_braces(pattern[: match.start()] + str(i).zfill(width) + pattern[match.end():])
        return out
    match = re.search(r"\{([^{}]*,[^{}]*)\}", pattern)
    if match:
        out = []
        for alt in match.group(1).split(","):
            out += expand_braces(pattern[: match.start()] + alt + pattern[match.end():])
        return out
    return [pattern]


def _webdataset_shards(paths: Sequence[str]) -> list[Shard]:
    return [Shard(name=os.path.basename(p), path=p, read=_read_tar, count_hint=_stats_count(p))
            for p in paths]


# ---- img2dataset parquet ---------------------------------------------------------

def _read_parquet(shard: Shard, skips: Skips) -> Iterator[Pair]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(shard.path)
    columns = parquet.schema_arrow.names
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            key = str(row.get("key"))
            where = f"{shard.name}:{key}"
            status = row.get("status")
            if status is not None and status != "success":
                skips.add(f"download {status}", where)
                continue
            if row.get("jpg") is None:
                skips.add("missing image", where)
                continue
            caption = row.get("caption")
            meta = {c: row[c] for c in columns if c not in ("jpg", "caption") and _json_safe(row[c])}
            pair = _make_pair(key, None if caption is None else caption.encode("utf-8"), row["jpg"],
                              None, meta, skips, where)
            if pair is not None:
                yield pair


def _json_safe(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _parquet_count(path: str) -> int | None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["status"])
        return sum(1 for s in table.column("status").to_pylist() if s == "success")
    except Exception:  # no status column or unreadable footer: count unknown, not an error
        return None


# ---- CSV / TSV -------------------------------------------------------------------

@dataclass
class CsvOptions:
    image_column: str = "filepath"
    caption_column: str = "title"
    separator: str | None = None  # None: tab for .tsv and open_clip's default, sniffed otherwise


def _csv_separator(path: str, options: CsvOptions) -> str:
    if options.separator:
        return options.separator
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = f.readline()
        return "\t" if "\t" in header else ","
    return "\t"  # .tsv and open_clip's CSV loader default


def _csv_reader(options: CsvOptions) -> Callable[[Shard, Skips], Iterator[Pair]]:
    def read(shard: Shard, skips: Skips) -> Iterator[Pair]:
        base = Path(shard.path).parent
        sep = _csv_separator(shard.path, options)
        with open(shard.path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f, delimiter=sep)
            width = 9
            for index, row in enumerate(rows):
                key = row.get("key") or str(index).zfill(width)
                where = f"{shard.name}:row {index + 2}"
                image_path = row.get(options.image_column) or ""
                if not image_path:
                    skips.add("missing image path", where)
                    continue
                resolved = _resolve(image_path, base)
                try:
                    data = resolved.read_bytes()
                except OSError:
                    skips.add("image file not found", f"{where} ({image_path})")
                    continue
                caption = row.get(options.caption_column)
                meta = {k: v for k, v in row.items() if k not in (options.image_column, options.caption_column)
                        and k is not None}
                meta["filepath"] = image_path
                pair = _make_pair(key, None if caption is None else caption.encode("utf-8"), data,
                                  resolved.suffix.lstrip(".").lower() or None, meta, skips, where)
                if pair is not None:
                    yield pair
    return read


def _resolve(image_path: str, base: Path) -> Path:
    """Relative paths resolve against the CSV's folder first, then the working directory."""
    path = Path(image_path)
    if path.is_absolute():
        return path
    beside = base / path
    return beside if beside.exists() else path


def _check_csv_header(path: str, options: CsvOptions) -> None:
    sep = _csv_separator(path, options)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f, delimiter=sep), [])
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not a UTF-8 text file")
    missing = [c for c in (options.image_column, options.caption_column) if c not in header]
    if missing:
        raise SourceError(
            f"{path}: missing column(s) {', '.join(missing)}; header has {', '.join(header) or 'nothing'} "
            f"(set --image-column / --caption-column, or --separator)")


# ---- folder of images + .txt -----------------------------------------------------

def _read_folder(shard: Shard, skips: Skips) -> Iterator[Pair]:
    root = Path(shard.path)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.is_file())
    for image_path in images:
        rel = image_path.relative_to(root).with_suffix("")
        key = rel.as_posix()
        where = f"{shard.name}:{key}"
        caption_path = image_path.with_suffix(".txt")
        caption = caption_path.read_bytes() if caption_path.exists() else None
        meta: dict = {"filepath": image_path.relative_to(root).as_posix()}
        json_path = image_path.with_suffix(".json")
        if json_path.exists():
            try:
                meta.update(json.loads(json_path.read_text()))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skips.add("unreadable json metadata (pair kept)", where)
        pair = _make_pair(key, caption, image_path.read_bytes(), image_path.suffix.lstrip(".").lower(),
                          meta, skips, where)
        if pair is not None:
            yield pair


# ---- detection -------------------------------------------------------------------

def _parquet_has_images(path: str) -> bool:
    import pyarrow.parquet as pq

    try:
        return "jpg" in pq.ParquetFile(path).schema_arrow.names
    except Exception:
        return False


def detect_format(path: str) -> str:
    """Guess a source's format from what is on disk."""
    if any(ch in path for ch in "{*?") or path.endswith(".tar"):
        return "webdataset"
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix == ".parquet":
            return "parquet"
        raise SourceError(f"{path}: unknown source format (expected a folder, .tar, .parquet, .csv or .tsv)")
    if not p.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    names = os.listdir(p)
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    parquets = sorted(n for n in names if n.endswith(".parquet"))
    if parquets and _parquet_has_images(str(p / parquets[0])):
        return "parquet"
    if any(x.suffix.lower().lstrip(".") in IMAGE_EXTS for x in p.rglob("*")):
        return "folder"
    raise SourceError(f"{path}: no pairs found (no .tar, image parquet, CSV or images with .txt captions)")


def open_pairs(path: str | Sequence[str], format: str | None = None,
               csv_options: CsvOptions | None = None) -> PairSource:
    """Open any supported source. `format` forces one of FORMATS instead of detecting."""
    if not isinstance(path, (str, os.PathLike)):
        paths = [str(p) for p in path]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise SourceError(f"{missing[0]}: no such file")
        return PairSource("webdataset", os.path.commonpath(paths), _webdataset_shards(paths))
    path = str(path)
    if format is not None and format not in FORMATS:
        raise SourceError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    fmt = format or detect_format(path)
    if fmt == "webdataset":
        if os.path.isdir(path):
            paths = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        else:
            paths = sorted(p for pat in expand_braces(path) for p in (glob.glob(pat) or [pat]))
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise SourceError(f"{missing[0]}: no such file")
        if not paths:
            raise SourceError(f"{path}: no .tar shards found")
        return PairSource(fmt, path, _webdataset_shards(paths))
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder")
    if fmt == "parquet":
        files = ([path] if os.path.isfile(path)
                 else sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet"))))
        files = [f for f in files if _parquet_has_images(f)]
        if not files:
            raise SourceError(f"{path}: no parquet files with an image column 'jpg'")
        return PairSource(fmt, path, [Shard(os.path.basename(f), f, _read_parquet, _parquet_count(f))
                                      for f in files])
    if fmt == "csv":
        options = csv_options or CsvOptions()
        if not os.path.isfile(path):
            raise SourceError(f"{path}: a CSV source must be a file")
        _check_csv_header(path, options)
        return PairSource(fmt, path, [Shard(os.path.basename(path), path, _csv_reader(options))])
    if not os.path.isdir(path):
        raise SourceError(f"{path}: a folder source must be a folder")
    return PairSource("folder", path, [Shard(os.path.basename(os.path.normpath(path)), path, _read_folder)])
