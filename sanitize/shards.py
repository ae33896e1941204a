"""Writing pairs as webdataset shards in img2dataset's layout.

Each shard is `NNNNN.tar` (members `{key}.{jpg|png|webp}`, `{key}.txt`,
`{key}.json`), a sidecar `NNNNN.parquet` with img2dataset's columns plus any
extra metadata, and `NNNNN_stats.json`. The folder also gets `sizes.json`, which
open_clip's trainer reads for the dataset size. Every file is written under a
temporary name and renamed into place, the tar last: a killed run never leaves
a shard that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Iterable

from .pairs import Pair

# img2dataset's sidecar parquet columns, in its order.
SIDECAR_COLUMNS = ("url", "caption", "key", "status", "error_message", "width", "height",
                   "original_width", "original_height", "exif", "sha256")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self._started = time.time()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # On error the pending shard is not written: nothing partial appears.

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
        existing = {}
        sizes_path = self.out_dir / "sizes.json"
        if sizes_path.exists():
            try:
                existing = json.loads(sizes_path.read_text())
            except json.JSONDecodeError:
                existing = {}
        existing.update(self.sizes)
        atomic_write_json(sizes_path, dict(sorted(existing.items())))

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = shard_name(self.shard_index)
        pairs, self._pending = self._pending, []
        rows = []
        tar_buffer = io.BytesIO()
        with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.USTAR_FORMAT
                          if all(len(p.key) < 90 for p in pairs) else tarfile.PAX_FORMAT) as tar:
            for pair in pairs:
                meta = dict(pair.meta)
                meta.update(key=pair.key, caption=pair.caption, status="success",
                            width=pair.image.width, height=pair.image.height)
                ext = "jpg" if pair.image_ext == "jpeg" else pair.image_ext
                _add_member(tar, f"{pair.key}.{ext}", pair.image_bytes, 0)
                _add_member(tar, f"{pair.key}.txt", pair.caption.encode("utf-8"), 0)
                _add_member(tar, f"{pair.key}.json",
                            json.dumps(meta, sort_keys=True, default=str).encode("utf-8"), 0)
                row = {c: meta.get(c) for c in SIDECAR_COLUMNS}
                row["sha256"] = row["sha256"] or hashlib.sha256(pair.image_bytes).hexdigest()
                for k, v in meta.items():
                    if k not in row and (v is None or isinstance(v, (str, int, float, bool))):
                        row[k] = v
                rows.append(row)
        columns = list(SIDECAR_COLUMNS) + sorted({k for r in rows for k in r} - set(SIDECAR_COLUMNS))
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
        parquet_buffer = io.BytesIO()
        pq.write_table(table, parquet_buffer)
        stats = {"count": len(pairs), "successes": len(pairs), "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": len(pairs)},
                 "written_by": "safeclip"}
        atomic_write_bytes(self.out_dir / f"{name}.parquet", parquet_buffer.getvalue())
        atomic_write_json(self.out_dir / f"{name}_stats.json", stats)
        atomic_write_bytes(self.out_dir / f"{name}.tar", tar_buffer.getvalue())  # last: marks the shard done
        self.sizes[f"{name}.tar"] = len(pairs)
        self.written += len(pairs)
        self.shard_index += 1


def write_pairs(pairs: Iterable[Pair], out_dir: str | os.PathLike, samples_per_shard: int = 10000) -> int:
    """Write all pairs to `out_dir`; returns the number written."""
    with ShardWriter(out_dir, samples_per_shard) as writer:
        writer.write_all(pairs)
    return writer.written
