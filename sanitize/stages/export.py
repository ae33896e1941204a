"""Resharding one partition of a split into webdataset tars, from the original source.

The partition files hold keys, not images; the images come from the source that
was embedded (recorded in `embed.json`, found through `split.json`). The output
is img2dataset's layout (see `shards.py`), so open_clip's trainer reads it with
`--dataset-type webdataset` and `sizes.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..io.pairs import PairSource, open_pairs
from ..io.shards import ShardWriter, atomic_write_json

PARTITIONS = ("safe", "risky")


def partition_keys(part_dir: str | os.PathLike, partition: str) -> set[str]:
    """All keys in PART/<partition>/*.parquet."""
    import pyarrow.parquet as pq

    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose safe or risky")
    folder = Path(part_dir) / partition
    files = sorted(f for f in folder.glob("*.parquet") if not f.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder}: no partition files (run `safeclip split` first)")
    keys: set[str] = set()
    for f in files:
        keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return keys


def source_of_split(part_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """(source path, format) of the pairs a split was made from, as split.json records them."""
    split_json = Path(part_dir) / "split.json"
    if not split_json.exists():
        raise FileNotFoundError(f"{part_dir}: no split.json (not a finished `safeclip split` output)")
    split = json.loads(split_json.read_text())
    return split.get("source"), split.get("source_format")


def export_partition(part_dir: str | os.PathLike, partition: str, out_dir: str | os.PathLike, *,
                     source: PairSource | None = None, samples_per_shard: int = 10000,
                     on_pair: Callable[[], None] | None = None) -> dict:
    """Write the partition's pairs, read from the original source, as webdataset shards.

    Returns counts, including keys of the partition that the source no longer
    has (`missing_from_source`), so the caller can report them."""
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose safe or risky")
    path, fmt = source_of_split(part_dir)  # also checks that PART is a finished split
    keys = partition_keys(part_dir, partition)
    if source is None:
        if not path:
            raise ValueError(f"{part_dir}/split.json does not record its source; pass it with --source")
        source = open_pairs(path, format=fmt)
    found: set[str] = set()
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for pair in source:
            if on_pair:
                on_pair()
            if pair.key in keys and pair.key not in found:
                found.add(pair.key)
                writer.write(pair)
    missing = keys - found
    stats = {"partition": partition, "split": os.path.abspath(part_dir), "source": source.root,
             "written": writer.written, "partition_size": len(keys), "missing_from_source": len(missing),
             "missing_examples": sorted(missing)[:10], "source_skips": source.skips.as_dict()}
    atomic_write_json(Path(out_dir) / "export_stats.json", stats)
    return stats
