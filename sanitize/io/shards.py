"""Writing pairs as webdataset shards in img2dataset's layout.

Each shard is `NNNNN.tar` (members `{key}.{jpg|png|webp}`, `{key}.txt`,
`{key}.json`), a sidecar `NNNNN.parquet` with img2dataset's columns plus any
extra metadata, and `NNNNN_stats.json`. The folder also gets `sizes.json`, which
open_clip's trainer reads for the dataset size. Every file is written under a
temporary name and renamed into place, the tar last: a killed run never leaves
a shard that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from .pairs import SIZES_FILE, Pair, is_safe_key, shard_stats_path

# img2dataset's sidecar parquet columns, in its order.
SIDECAR_COLUMNS = ("url", "caption", "key", "status", "error_message", "width", "height",
                   "original_width", "original_height", "exif", "sha256")


def temp_path(path: str | os.PathLike) -> Path:
    """Where a file is written before it is renamed into place: a hidden name that matches
    no reader's pattern (*.tar, *.parquet, *.json) and ends in the writer's process id."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on success it is synced and renamed to `path`, on
    any error (a full disk included) it is removed: `path` is whole or untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        named = write_error(exc, path)
        if named is not exc:
            raise named from exc
        raise


def write_error(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """A failed write that says which file: an OSError from the system (a full disk, a
    quota, a file size limit) gets `path` as its file name; pyarrow's, which carries the
    errno only in its text ("[errno 28] …"), becomes a plain OSError. Anything else as is."""
    if not isinstance(exc, OSError):
        return exc
    if exc.errno is not None:
        if exc.filename is None:
            exc.filename = str(path)
        return exc
    match = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code), str(path))
    return exc


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


_TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (`temp_path`) that writers killed before their rename
    left in `folder`; files of a process still running are kept. Returns those removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match and path.is_file() and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it yet: a leftover of an earlier one with our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_name(index: int) -> str:
    return f"{index:05d}"


class ShardWriter:
    """Write pairs into numbered shards of `samples_per_shard` pairs.

    Use as a context manager; `write(pair)` appends, `close()` flushes the last
    shard and writes `sizes.json`. Files are deterministic for equal input
    (fixed mtime), so reruns with a seed reproduce byte-identical shards.
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 10000, start_shard: int = 0):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shard_index = start_shard
        self.sizes: dict[str, int] = {}
        self.written = 0
        self._pending: list[Pair] = []
        self._column_types: dict = {}  # extra sidecar column -> arrow type, fixed by its first shard

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # On error the pending shard is dropped (nothing partial appears), and
            # sizes.json lists exactly the shards that were completed.
            self._pending = []
            if self.sizes:
                self._write_sizes()

    def write(self, pair: Pair) -> None:
        self._pending.append(pair)
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def write_all(self, pairs: Iterable[Pair]) -> None:
        for pair in pairs:
            self.write(pair)

    def close(self) -> None:
        if self._pending:
            self._flush()
        self._write_sizes()

    def _write_sizes(self) -> None:
        """open_clip looks up every shard it trains on in sizes.json, so entries of
        shards already in the folder are kept (appending runs), stale ones dropped."""
        sizes_path = self.out_dir / SIZES_FILE
        existing = {}
        if sizes_path.exists():
            try:
                existing = json.loads(sizes_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                existing = {}
            if not isinstance(existing, dict):
                existing = {}
        existing = {name: n for name, n in existing.items() if (self.out_dir / name).exists()}
        existing.update(self.sizes)
        atomic_write_json(sizes_path, dict(sorted(existing.items())))

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        name = shard_name(self.shard_index)
        pairs, self._pending = self._pending, []
        _check_keys(pairs, name)
        rows = []
        tar_buffer = io.BytesIO()
        with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for pair in pairs:
                ext, image_bytes = _member_image(pair)
                meta = dict(pair.meta)
                meta.update(key=pair.key, caption=pair.caption, status="success",
                            width=pair.image.width, height=pair.image.height)
                # Members of one key are contiguous (image, txt, json), as webdataset expects.
                _add_member(tar, f"{pair.key}.{ext}", image_bytes, 0)
                _add_member(tar, f"{pair.key}.txt", pair.caption.encode("utf-8"), 0)
                _add_member(tar, f"{pair.key}.json",
                            json.dumps(meta, sort_keys=True, default=str).encode("utf-8"), 0)
                row = {c: meta.get(c) for c in SIDECAR_COLUMNS}
                row["sha256"] = row["sha256"] or hashlib.sha256(image_bytes).hexdigest()
                for k, v in meta.items():
                    if k not in row and (v is None or isinstance(v, (str, int, float, bool))):
                        row[k] = v
                rows.append(row)
        parquet_buffer = io.BytesIO()
        pq.write_table(_sidecar_table(rows, self._column_types), parquet_buffer)
        stats = {"count": len(pairs), "successes": len(pairs), "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": len(pairs)},
                 "written_by": "safeclip"}
        atomic_write_bytes(self.out_dir / f"{name}.parquet", parquet_buffer.getvalue())
        atomic_write_json(shard_stats_path(str(self.out_dir / f"{name}.tar")), stats)
        atomic_write_bytes(self.out_dir / f"{name}.tar", tar_buffer.getvalue())  # last: marks the shard done
        self.sizes[f"{name}.tar"] = len(pairs)
        self.written += len(pairs)
        self.shard_index += 1


def _check_keys(pairs: list[Pair], shard: str) -> None:
    """Readers split member names at the first dot of the basename and group by key,
    so a dotted or repeated key would silently merge or corrupt pairs."""
    seen: set[str] = set()
    for pair in pairs:
        base = pair.key.rsplit("/", 1)[-1]
        if not base or "." in base or pair.key != pair.key.strip():
            raise ValueError(f"key {pair.key!r} cannot be stored in a webdataset tar "
                             f"(no dots, whitespace ends or empty names; see sanitize.pairs.safe_key)")
        if not is_safe_key(pair.key):
            raise ValueError(f"key {pair.key!r} is not a safe member name (absolute, '..' or control "
                             f"characters); it is never written into a tar")
        if pair.key in seen:
            raise ValueError(f"duplicate key {pair.key!r} in shard {shard}")
        seen.add(pair.key)


def _member_image(pair: Pair) -> tuple[str, bytes]:
    """The member extension and bytes: the original encoding when webdataset and
    open_clip read it (jpg/png/webp), else a lossless PNG of the decoded image."""
    ext = "jpg" if pair.image_ext.lower() == "jpeg" else pair.image_ext.lower()
    if ext in ("jpg", "png", "webp"):
        return ext, pair.image_bytes
    buffer = io.BytesIO()
    pair.image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


# Types of img2dataset's sidecar columns, so every shard's parquet has one schema
# (an all-null column would otherwise be typed `null` and clash across shards).
_SIDECAR_TYPES = {"width": "int32", "height": "int32", "original_width": "int32",
                  "original_height": "int32"}


def _sidecar_table(rows: list[dict], known: dict | None = None):
    """The sidecar table. `known` maps extra columns to the type an earlier shard
    gave them (updated in place), so a writer's shards share one schema."""
    import pyarrow as pa

    known = {} if known is None else known

    columns = list(SIDECAR_COLUMNS) + sorted({k for r in rows for k in r} - set(SIDECAR_COLUMNS))
    arrays = {}
    for column in columns:
        values = [r.get(column) for r in rows]
        if column in SIDECAR_COLUMNS:
            kind = _SIDECAR_TYPES.get(column, "string")
            if kind == "string":
                values = [None if v is None else str(v) for v in values]
            arrays[column] = pa.array(values, type=pa.type_for_alias(kind))
            continue
        try:
            array = pa.array(values, type=known.get(column))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types in one metadata field
            array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        if pa.types.is_null(array.type):
            array = array.cast(pa.string())
        known.setdefault(column, array.type)
        arrays[column] = array
    return pa.table(arrays)


def write_pairs(pairs: Iterable[Pair], out_dir: str | os.PathLike, samples_per_shard: int = 10000) -> int:
    """Write all pairs to `out_dir`; returns the number written."""
    with ShardWriter(out_dir, samples_per_shard) as writer:
        writer.write_all(pairs)
    return writer.written
