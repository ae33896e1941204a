"""Reading image–caption pairs from every source safeclip accepts, as they come.

`open_pairs(path)` detects the format and returns a `PairSource`: a list of
shards, each iterable as `Pair`s with a stable `key`. Per-pair problems (an
unreadable image, an empty caption, …) are skipped and counted in
`source.skips` with their reason, never dropped silently; problems with the
source as a whole raise `SourceError` with a one-line message.

Keys are the contract (docs/reliability.md): a pair is identified by its shard and
its key, and keys are unique in a source. A tar member whose name is absolute or
has a `..` component is skipped and counted, never used as a key. A key that occurs
again is an error by default (`DuplicateKeyError`, naming it); with
`duplicate_keys="rename"` its n-th occurrence in source order (shard order, then
position) is read as `{key}~{n}`, the same on every read. Repeats inside one shard
are caught as they are read; repeats across shards by `embed` and `split`, which see
every key (or, with "rename", by a scan of the keys when the source is opened).

Lanes: `shard.in_lane(i, n)` reads every n-th candidate pair of a shard, starting at the
i-th, so n processes can decode one shard together (embed does this when a source has
fewer shards than workers). Every lane reads the whole shard's bytes but decodes and
yields only its own pairs, each with its `position` in the shard, so the lanes' outputs
merge back into reading order. A pair-level skip is counted by the lane that owns the
pair, a shard-level one (an unreadable or truncated file) by lane 0 only: the lanes'
counts add up to one whole read's.

Formats:
  webdataset  img2dataset's webdataset output: NNNNN.tar with {key}.jpg|png|webp,
              {key}.txt, {key}.json (a folder, a brace pattern, or .tar paths)
  parquet     img2dataset's parquet output: image bytes in column `jpg` (or `png`,
              `webp`, after img2dataset's --encode_format)
  csv         a CSV/TSV with an image-path column and a caption column
  folder      images with same-named .txt captions
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import io
import json
import os
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# img2dataset's layout beside the tars: per-shard stats, and open_clip's shard sizes.
SHARD_STATS_SUFFIX = "_stats.json"
SIZES_FILE = "sizes.json"
FORMATS = ("webdataset", "parquet", "csv", "folder")
DUPLICATE_KEYS = ("error", "rename")
# PIL formats kept byte-for-byte; anything else (BMP, GIF, TIFF, …) is re-encoded as
# PNG on read, because webdataset/open_clip consumers only look for jpg/png/webp.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: phone JPEGs


class SourceError(Exception):
    """A source that cannot be read at all (missing, unknown format, missing column)."""


class DuplicateKeyError(SourceError):
    """A key that occurs twice in a source (with duplicate_keys="error")."""


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
    position: int = -1  # its place among the shard's candidate pairs, in reading order


@dataclass
class Skips:
    """Counted per-pair skips: reason -> count, plus a few example keys per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def merge(self, other: "Skips") -> None:
        """Add another reader's counts (e.g. from a DataLoader worker)."""
        self.counts.update(other.counts)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(examples[: max(0, 5 - len(mine))])

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


def safe_key(key: str) -> str:
    """A key webdataset can round-trip: it splits a member name at the first dot of
    its basename, so dots (and whitespace) in keys become underscores."""
    return re.sub(r"[.\s]", "_", key.strip("/")) or "_"


def is_safe_key(key: str) -> bool:
    """Whether a key can name files inside a tar and on disk without leaving the folder
    they are extracted to: not absolute, no `..` component, no backslash, no control
    characters. Readers skip pairs whose name fails this; writers refuse them."""
    return (bool(key) and not key.startswith("/") and "\\" not in key and ".." not in key.split("/")
            and not any(ord(c) < 32 for c in key))


def duplicate_key_message(key: str, where: str) -> str:
    return (f"{where}: key {key!r} occurs more than once in the source; keys must be unique "
            f"(fix the source, or embed it with --duplicate-keys rename: see docs/reliability.md)")


@dataclass
class Shard:
    """One unit of reading (a tar, a parquet file, a CSV, a folder). Iterating it
    yields pairs; `count_hint` is the expected pair count when cheaply known.
    `read` is a module-level function (or a partial of one) so shards pickle into
    DataLoader workers under any start method."""

    name: str
    path: str
    read: Callable[["Shard", Skips], Iterator[Pair]]
    count_hint: int | None = None
    lane: tuple[int, int] = (0, 1)  # (this lane, lanes): see the module's docstring

    def pairs(self, skips: Skips) -> Iterator[Pair]:
        return self.read(self, skips)

    def in_lane(self, index: int, lanes: int) -> "Shard":
        """This shard, reading only candidates index, index + lanes, index + 2 lanes, ..."""
        if not 0 <= index < lanes:
            raise ValueError(f"lane {index} of {lanes}")
        return dataclasses.replace(self, lane=(index, lanes))

    def owns(self, position: int) -> bool:
        """Whether the candidate pair at `position` is this lane's to decode and count."""
        return position % self.lane[1] == self.lane[0]

    @property
    def counts_shard_skips(self) -> bool:
        """Skips of the shard as a whole are counted once, by lane 0."""
        return self.lane[0] == 0


def _unique_keys(earlier: dict[str, int], rename: bool, inner: Callable, shard: Shard,
                 skips: Skips) -> Iterator[Pair]:
    """A shard reader that enforces the key rule: `earlier` counts the keys of this shard
    that earlier shards also hold (from the key scan; empty without one). A repeat is an
    error, or with `rename` its n-th occurrence is read as `{key}~{n}` (module level: pickles)."""
    seen: dict[str, int] = {}
    for pair in inner(shard, skips):
        n = seen.get(pair.key, 0) + 1
        seen[pair.key] = n
        n += earlier.get(pair.key, 0)
        if n > 1:
            if not rename:
                raise DuplicateKeyError(duplicate_key_message(pair.key, shard.name))
            pair.meta = {**pair.meta, "original_key": pair.key}
            pair.key = f"{pair.key}~{n}"
        yield pair


@dataclass
class PairSource:
    """A source's shards. Iterating reads every shard in order and counts skips in
    `skips` (they add up over passes; readers in other processes keep their own
    `Skips` per shard and `merge` them)."""

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


_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _make_pair(key: str, caption_bytes: bytes | None, image_bytes: bytes | None, image_ext: str | None,
               meta: dict, skips: Skips, where: str, position: int) -> Pair | None:
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
    except _IMAGE_ERRORS:
        skips.add("unreadable image", where)
        return None
    kept = _KEPT_FORMATS.get(image.format or "")
    if kept is None:
        if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            image = image.convert("RGB")  # e.g. CMYK TIFF: PNG cannot hold it
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image_bytes, image_ext = buffer.getvalue(), "png"
    elif image_ext is None or image_ext.lower() not in IMAGE_EXTS:
        image_ext = kept
    return Pair(key=key, caption=caption, image=image, image_bytes=image_bytes,
                image_ext=image_ext.lower(), meta=meta, position=position)


# ---- webdataset ------------------------------------------------------------------

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's key/extension split
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _tar_pair(shard: Shard, key: str, members: dict[str, bytes], skips: Skips, position: int) -> Pair | None:
    where = f"{shard.name}:{key}"
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            meta = {}
            skips.add("unreadable json metadata (pair kept)", where)
    return _make_pair(key, members.get("txt"), members.get(image_ext) if image_ext else None,
                      image_ext, meta, skips, where, position)


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """True when the archive ends with tar's zero end-of-archive block. tarfile stops
    silently at a cut on a header boundary or at a garbled header, so this check is
    what tells a truncated shard from a complete one."""
    try:
        tar.fileobj.seek(tar.offset)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    except _TAR_ERRORS:
        return False
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def _has_pair(members: dict[str, bytes]) -> bool:
    return "txt" in members and any(e in members for e in IMAGE_EXTS)


def _read_tar(shard: Shard, skips: Skips) -> Iterator[Pair]:
    """Stream a tar as webdataset does: members of one key come together and a pair
    is emitted when the key changes, so memory stays at one pair per shard and the
    order is the tar's own. A group still missing its image or caption when the key
    changes waits until the end instead (a tar made without `--sort=name` can scatter
    a key's members), and is counted with its reason if nothing completes it."""
    shard_skips = skips if shard.counts_shard_skips else Skips()  # lanes > 0 count pairs only
    try:
        tar = tarfile.open(shard.path, "r")
    except _TAR_ERRORS:
        shard_skips.add("unreadable tar shard (all its pairs)", shard.name, n=shard.count_hint or 1)
        return
    groups: dict[str, dict[str, bytes]] = {}  # the current group and incomplete ones
    emitted: set[str] = set()
    unsafe: set[str] = set()
    key: str | None = None
    complete = False
    position = -1
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                match = _MEMBER.match(member.name)
                if not match:
                    continue
                name, ext = match.group(1), match.group(2).lower()
                if not is_safe_key(name):
                    if name not in unsafe:  # one count per pair, not per member
                        unsafe.add(name)
                        shard_skips.add("unsafe member name (absolute or '..' path; pair skipped)",
                                  f"{shard.name}:{member.name!r}")
                    continue
                if name != key:
                    if key in groups and _has_pair(groups[key]):
                        emitted.add(key)
                        members = groups.pop(key)
                        position += 1
                        pair = _tar_pair(shard, key, members, skips, position) if shard.owns(position) else None
                        if pair is not None:
                            yield pair
                    key = name
                if name in emitted:
                    shard_skips.add("tar member after its pair was read (ignored, pair kept)",
                              f"{shard.name}:{member.name}")
                    continue
                group = groups.setdefault(name, {})  # before reading: a cut in the data names this pair
                group[ext] = tar.extractfile(member).read()
            complete = _ends_cleanly(tar)
        except _TAR_ERRORS:
            complete = False
    seen = len(emitted) + len(groups)  # pairs met before the end or the cut
    for name, members in groups.items():
        position += 1
        if not shard.owns(position):
            continue
        if not complete and name == key and not _has_pair(members):
            # The cut fell inside this pair; a pair whose image and caption made it is kept.
            skips.add("truncated tar (pair cut off)", f"{shard.name}:{name}")
            continue
        pair = _tar_pair(shard, name, members, skips, position)
        if pair is not None:
            yield pair
    if not complete:
        # Pairs after the cut are lost: the shard's _stats.json says how many there
        # were; without it the count is unknown and the shard is counted once, by name.
        if shard.count_hint is not None and shard.count_hint <= seen:
            # Only the end-of-archive block is missing: noted, but no pair is lost.
            shard_skips.add("truncated tar (end missing, no pair lost)", shard.name, n=0)
        else:
            lost = shard.count_hint - seen if shard.count_hint is not None else 1
            shard_skips.add("truncated tar (rest of shard lost)", shard.name, n=lost)


def _tar_keys(shard: Shard) -> list[str]:
    """The keys a tar can yield, in order, from its headers alone (for the key scan)."""
    keys: dict[str, None] = {}
    try:
        with tarfile.open(shard.path, "r") as tar:
            for member in tar:
                match = _MEMBER.match(member.name) if member.isfile() else None
                if match and is_safe_key(match.group(1)):
                    keys.setdefault(match.group(1))
    except _TAR_ERRORS:
        pass  # what was listed before the damage; the reader counts the rest
    return list(keys)


def shard_stats_path(tar_path: str) -> str:
    """img2dataset's `NNNNN_stats.json` beside `NNNNN.tar` (or `.tar.gz`)."""
    return re.sub(r"\.tar(\.gz)?$", "", tar_path) + SHARD_STATS_SUFFIX


def _stats_count(tar_path: str) -> int | None:
    stats = shard_stats_path(tar_path)
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


def _check_tar_files(paths: Sequence[str]) -> None:
    """Named files must exist and be tars; a broken shard found while reading a folder
    is a counted skip instead, so one bad shard does not stop a long run."""
    for p in paths:
        if not os.path.exists(p):
            raise SourceError(f"{p}: no such file")
        if os.path.isdir(p):
            raise SourceError(f"{p}: is a folder, not a .tar shard")
    if len(paths) == 1 and not _looks_like_tar(paths[0]):
        raise SourceError(f"{paths[0]}: not a tar file (wrong --format?)")


def _looks_like_tar(path: str) -> bool:
    try:
        with tarfile.open(path, "r"):
            return True
    except _TAR_ERRORS:
        return False


# ---- img2dataset parquet ---------------------------------------------------------

_PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp")


def _read_parquet(shard: Shard, skips: Skips) -> Iterator[Pair]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(shard.path)
    except Exception:  # pyarrow raises ArrowInvalid/OSError for a cut or garbled file
        if shard.counts_shard_skips:
            skips.add("unreadable parquet shard (all its pairs)", shard.name, n=shard.count_hint or 1)
        return
    columns = parquet.schema_arrow.names
    # img2dataset names the bytes column after --encode_format: jpg (default), png or webp.
    image_col = next(c for c in _PARQUET_IMAGE_COLUMNS if c in columns)
    index = 0
    for batch in parquet.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            position, index = index, index + 1
            if not shard.owns(position):
                continue
            key = _parquet_key(row.get("key"), shard, position)
            where = f"{shard.name}:{key}"
            status = row.get("status")
            if status is not None and status != "success":
                skips.add(f"not downloaded ({status})", where)
                continue
            if row.get(image_col) is None:
                skips.add("missing image", where)
                continue
            if not isinstance(row[image_col], bytes):
                skips.add(f"image column {image_col!r} holds {type(row[image_col]).__name__}, not bytes", where)
                continue
            caption = row.get("caption")
            meta = {c: row[c] for c in columns
                    if c not in _PARQUET_IMAGE_COLUMNS and c != "caption" and _json_safe(row[c])}
            pair = _make_pair(key, None if caption is None else caption.encode("utf-8"), row[image_col],
                              image_col, meta, skips, where, position)
            if pair is not None:
                yield pair


def _parquet_key(value: object, shard: Shard, index: int) -> str:
    return safe_key(str(value)) if value is not None else f"{Path(shard.name).stem}-{index:09d}"


def _parquet_keys(shard: Shard) -> list[str]:
    """Every row's key, from the key column alone (for the key scan)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(shard.path)
        if "key" not in parquet.schema_arrow.names:
            return [_parquet_key(None, shard, i) for i in range(parquet.metadata.num_rows)]
        values = parquet.read(columns=["key"]).column("key").to_pylist()
    except Exception:  # unreadable: the reader counts it
        return []
    return [_parquet_key(v, shard, i) for i, v in enumerate(values)]


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


def _open_text(path: str):
    """Text mode that never fails on bytes: undecodable bytes survive as surrogates
    (re-encoded with the same handler for paths) and are caught per caption; a BOM
    from spreadsheet exports is dropped so the first column name still matches."""
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def _csv_separator(path: str, options: CsvOptions) -> str:
    if options.separator:
        return options.separator
    if path.lower().endswith(".csv"):
        with _open_text(path) as f:
            header = f.readline()
        return "\t" if "\t" in header else ","
    return "\t"  # .tsv and open_clip's CSV loader default


def _read_csv(options: CsvOptions, shard: Shard, skips: Skips) -> Iterator[Pair]:
    base = Path(shard.path).parent
    sep = _csv_separator(shard.path, options)
    with _open_text(shard.path) as f:
        reader = csv.reader(f, delimiter=sep)
        header = next(reader, [])
        index = -1
        while True:
            index += 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # e.g. an over-long field; the reader resumes on the next row
                if shard.owns(index):
                    skips.add(f"malformed CSV row ({exc})", f"{shard.name}:line {reader.line_num}")
                continue
            if not values:
                index -= 1  # blank line: not a row
                continue
            if not shard.owns(index):
                continue
            where = f"{shard.name}:line {reader.line_num}"
            row = dict(zip(header, values))
            key = safe_key(row["key"]) if row.get("key") else str(index).zfill(9)
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
                    and _is_text(v)}
            if _is_text(image_path):
                meta["filepath"] = image_path
            pair = _make_pair(key, None if caption is None else caption.encode("utf-8", "surrogateescape"),
                              data, resolved.suffix.lstrip(".").lower() or None, meta, skips, where, index)
            if pair is not None:
                yield pair


def _is_text(value: str) -> bool:
    """False for strings carrying undecodable bytes, which would poison JSON/Parquet."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _csv_reader(options: CsvOptions) -> Callable[[Shard, Skips], Iterator[Pair]]:
    return functools.partial(_read_csv, options)


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
        with _open_text(path) as f:
            header = next(csv.reader(f, delimiter=sep), [])
    except csv.Error as exc:
        raise SourceError(f"{path}: not a readable CSV/TSV ({exc})")
    missing = [c for c in (options.image_column, options.caption_column) if c not in header]
    if missing:
        shown = ", ".join(repr(c) for c in header[:10]) or "nothing"
        raise SourceError(
            f"{path}: missing column(s) {', '.join(missing)}; header has {shown} "
            f"(set --image-column / --caption-column, or --separator)")


# ---- folder of images + .txt -----------------------------------------------------

def _read_folder(shard: Shard, skips: Skips) -> Iterator[Pair]:
    root = Path(shard.path)
    # Hidden files and folders (.ipynb_checkpoints, macOS ._ files) are not part of a dataset.
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for position, image_path in enumerate(images):
        if not shard.owns(position):
            continue
        rel = image_path.relative_to(root).with_suffix("")
        key = safe_key(rel.as_posix())
        where = f"{shard.name}:{rel.as_posix()}"
        caption_path = image_path.with_suffix(".txt")
        try:
            caption = caption_path.read_bytes() if caption_path.exists() else None
            data = image_path.read_bytes()
        except OSError:
            skips.add("unreadable file", where)
            continue
        meta: dict = {"filepath": image_path.relative_to(root).as_posix()}
        json_path = image_path.with_suffix(".json")
        if json_path.exists():
            try:
                extra = json.loads(json_path.read_bytes().decode("utf-8"))
                if not isinstance(extra, dict):
                    raise ValueError
                meta.update(extra)
            except (OSError, ValueError):
                skips.add("unreadable json metadata (pair kept)", where)
        pair = _make_pair(key, caption, data, image_path.suffix.lstrip(".").lower(), meta, skips, where, position)
        if pair is not None:
            yield pair


# ---- detection -------------------------------------------------------------------

def _parquet_has_images(path: str) -> bool:
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
        return any(c in names for c in _PARQUET_IMAGE_COLUMNS)
    except Exception:
        return False


def detect_format(path: str) -> str:
    """Guess a source's format from what is on disk."""
    if any(ch in path for ch in "{*?") or path.endswith((".tar", ".tar.gz")):
        return "webdataset"
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix == ".parquet":
            return "parquet"
        raise SourceError(f"{path}: unknown source format (expected a folder, .tar, .parquet, .csv or .tsv; "
                          f"or force one with --format)")
    if not p.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    names = os.listdir(p)
    if any(n.endswith((".tar", ".tar.gz")) for n in names):  # .tar.gz: gzipped shards (bundled sample)
        return "webdataset"
    parquets = sorted(n for n in names if n.endswith(".parquet"))
    if parquets and _parquet_has_images(str(p / parquets[0])):
        return "parquet"
    if any(x.suffix.lower().lstrip(".") in IMAGE_EXTS for x in p.rglob("*")):
        return "folder"
    raise SourceError(f"{path}: no pairs found (no .tar, image parquet, CSV or images with .txt captions)")


def open_pairs(path: str | os.PathLike | Sequence[str], format: str | None = None,
               csv_options: CsvOptions | None = None, duplicate_keys: str = "error") -> PairSource:
    """Open any supported source. `format` forces one of FORMATS instead of detecting;
    `duplicate_keys` is "error" (the default) or "rename" (see the module's docstring)."""
    if format is not None and format not in FORMATS:
        raise SourceError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if duplicate_keys not in DUPLICATE_KEYS:
        raise SourceError(f"unknown --duplicate-keys {duplicate_keys!r}; choose one of {', '.join(DUPLICATE_KEYS)}")
    source = _open(path, format, csv_options)
    return _with_key_rule(source, duplicate_keys == "rename")


def _with_key_rule(source: PairSource, rename: bool) -> PairSource:
    """Wrap every shard's reader in `_unique_keys`. With `rename` and several shards, the
    keys are scanned first (tar headers, Parquet key columns) so each shard knows how
    often its keys occurred before it."""
    earlier: list[dict[str, int]] = [{} for _ in source.shards]
    scan = {"webdataset": _tar_keys, "parquet": _parquet_keys}.get(source.format)
    if rename and scan is not None and len(source.shards) > 1:
        totals: Counter = Counter()
        for i, shard in enumerate(source.shards):
            keys = Counter(scan(shard))
            earlier[i] = {k: totals[k] for k in keys if totals[k]}
            totals.update(keys)
    source.shards = [Shard(s.name, s.path, functools.partial(_unique_keys, earlier[i], rename, s.read),
                           s.count_hint) for i, s in enumerate(source.shards)]
    return source


def _open(path: str | os.PathLike | Sequence[str], format: str | None, csv_options: CsvOptions | None
          ) -> PairSource:
    if not isinstance(path, (str, os.PathLike)):
        paths = [str(p) for p in path]
        if not paths:
            raise SourceError("no source given")
        if format not in (None, "webdataset"):
            raise SourceError(f"a list of files is read as webdataset shards, not {format}")
        _check_tar_files(paths)
        return PairSource("webdataset", os.path.commonpath(paths), _webdataset_shards(paths))
    path = str(path)
    fmt = format or detect_format(path)
    if fmt == "webdataset":
        if os.path.isdir(path):
            paths = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar"))
                           + glob.glob(os.path.join(glob.escape(path), "*.tar.gz")))
            if not paths:
                raise SourceError(f"{path}: no .tar shards in this folder")
        else:
            paths = sorted(p for pat in expand_braces(path) for p in (glob.glob(pat) or [pat]))
            _check_tar_files(paths)
        return PairSource(fmt, path, _webdataset_shards(paths))
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder")
    if fmt == "parquet":
        files = ([path] if os.path.isfile(path)
                 else sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet"))))
        files = [f for f in files if _parquet_has_images(f)]
        if not files:
            raise SourceError(f"{path}: no parquet files with an image column (jpg, png or webp) "
                              f"(wrong --format?)")
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


# ---- subsets ---------------------------------------------------------------------

def _read_only(keys: frozenset, inner: Callable, shard: Shard, skips: Skips) -> Iterator[Pair]:
    """A shard reader that yields only the pairs whose key is in `keys` (module level: pickles)."""
    for pair in inner(shard, skips):
        if pair.key in keys:
            yield pair


def subset_source(source: PairSource, keys_by_shard: dict[str, list[str]]) -> PairSource:
    """The pairs of `source` whose keys are listed for their shard, by the shard's embedding
    file stem (a split partition's `Split.keys`). Shard order and positions are kept, so
    data order stays a function of the seed."""
    from .artifacts import embedding_file_name

    shards = []
    for shard in source.shards:
        keys = frozenset(keys_by_shard.get(Path(embedding_file_name(shard.name)).stem, ()))
        shards.append(Shard(shard.name, shard.path, functools.partial(_read_only, keys, shard.read), len(keys)))
    return PairSource(source.format, source.root, shards)
