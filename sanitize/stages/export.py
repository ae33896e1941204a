"""Resharding one partition of a split into webdataset tars, from the original source.

The partition files hold keys, not images; the images come from the source that
was embedded (recorded in `embed.json`, found through `split.json`). A pair is
selected by its identity, (input shard, key): a key that occurs more than once in
the split is taken only from the shard whose partition file lists it, so a risky
copy of a key can never be exported as a safe one. The output is img2dataset's layout (see
`shards.py`), so open_clip's trainer reads it with `--dataset-type webdataset` and `sizes.json`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..io.artifacts import PARTITIONS, Split, embedding_file_name, repeated_keys
from ..io.pairs import PairSource, open_pairs
from ..io.shards import ShardWriter, atomic_write_json

# open_clip's webdataset loader breaks on newer webdataset (open_clip issue #935: an end-of-shard
# `{}` sample, KeyError 'fname'); open_clip's own training extra pins this.
OPEN_CLIP_WEBDATASET_MAX = (0, 2, 86)

def export_partition(part_dir: str | os.PathLike, partition: str, out_dir: str | os.PathLike, *,
                     source: PairSource | None = None, samples_per_shard: int = 10000,
                     on_pair: Callable[[], None] | None = None) -> dict:
    """Write the partition's pairs, read from the original source, as webdataset shards.

    Returns counts, including keys of the partition that the source no longer
    has (`missing_from_source`), so the caller can report them."""
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose safe or risky")
    split = Split(part_dir)
    manifest = split.check_complete()  # a half-written split is never exported
    path, fmt = manifest.source, manifest.source_format
    # A pair's identity is (input shard, key). Keys the split holds once identify their pair
    # alone (so --source may name a re-sharded copy); a key it holds more than once (a split
    # made before keys were checked) is taken only from the shard its partition file names.
    repeated = repeated_keys(split.files("safe") + split.files("risky"))
    by_key: set[str] = set()
    by_shard: set[tuple[str, str]] = set()
    for stem, keys in split.keys(partition).items():
        for key in keys:
            if key in repeated:
                by_shard.add((stem, key))
            else:
                by_key.add(key)
    if source is None:
        if not path:
            raise ValueError(f"{split.manifest_path} does not record its source; pass it with --source")
        source = open_pairs(path, format=fmt, duplicate_keys=manifest.duplicate_keys)
    found: set[tuple[str, str]] = set()
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for shard in source.shards:
            stem = Path(embedding_file_name(shard.name)).stem
            for pair in shard.pairs(source.skips):
                if on_pair:
                    on_pair()
                ident = (stem, pair.key) if pair.key in repeated else ("", pair.key)
                if ident not in found and (pair.key in by_key or ident in by_shard):
                    found.add(ident)
                    writer.write(pair)
    missing = sorted([key for key in by_key if ("", key) not in found]
                     + [f"{stem}:{key}" for stem, key in by_shard if (stem, key) not in found])
    keys = by_key | by_shard
    stats = {"partition": partition, "split": os.path.abspath(part_dir), "source": source.root,
             "written": writer.written, "shards": -(-writer.written // samples_per_shard),
             "partition_size": len(keys), "missing_from_source": len(missing),
             "missing_examples": missing[:10], "source_skips": source.skips.as_dict()}
    atomic_write_json(Path(out_dir) / "export_stats.json", stats)
    return stats


def open_clip_command(out_dir: str | os.PathLike, shards: int) -> str:
    """The open_clip_train command line that trains on an export (sizes.json gives the size)."""
    last = max(shards - 1, 0)
    data = f"{out_dir}/{{00000..{last:05d}}}.tar" if shards > 1 else f"{out_dir}/00000.tar"
    return (f"python -m open_clip_train.main --train-data '{data}' --dataset-type webdataset "
            f"--model ViT-B-32")


def open_clip_trainer_problem() -> str | None:
    """Why `python -m open_clip_train.main` would fail on an export here, or None."""
    from importlib import metadata

    try:
        version = metadata.version("webdataset")
    except metadata.PackageNotFoundError:
        return "open_clip's trainer needs its training extra: pip install 'safeclip[train]'"
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if parts > OPEN_CLIP_WEBDATASET_MAX:
        return (f"webdataset {version} breaks open_clip's trainer on its first batch (open_clip issue #935); "
                f"pip install 'safeclip[train]' installs the version it supports (<= 0.2.86)")
    return None
