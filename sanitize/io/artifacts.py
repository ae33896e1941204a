"""The folders safeclip's stages hand to each other: the one place their file names live.

  Embeddings   EMB/NNNNN.parquet, one per input shard, then EMB/embed.json (written last)
  Split        PART/safe/NNNNN.parquet, PART/risky/NNNNN.parquet, then PART/split.json (last)
  Poisoned     SRC/<shards>, SRC/manifest.parquet (ground truth per pair), SRC/poison.json
  Run          RUN/warmup.pt (+ warmup_metrics.jsonl, warmup_stats.json),
               RUN/checkpoints/epoch_KKKK.pt, RUN/scores/epoch=K/ (an Embeddings folder),
               RUN/splits/epoch=K/ (a Split folder), RUN/config.json, RUN/metrics.jsonl,
               RUN/pretrain_stats.json

A folder's manifest is written after every data file, atomically, so a folder with a
manifest is complete; files whose name starts with a dot are temporary and never read.
The manifests are dataclasses with `to_json`/`from_json`; `from_json` reads every
version this code has written (older ones lack the `schema` field).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .shards import atomic_write_bytes, atomic_write_json

PARTITIONS = ("safe", "risky")
EMBED_SCHEMA = "safeclip.embed/1"
SPLIT_SCHEMA = "safeclip.split/1"


def parquet_files(folder: str | os.PathLike) -> list[Path]:
    """The finished Parquet files of a folder, by name (dotfiles are unfinished temp files)."""
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent}: no {path.name} (not a finished {what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable {path.name} ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a {what} manifest")
    return data


def _known(cls, data: dict) -> tuple[dict, dict]:
    """Split a JSON dict into the dataclass's fields and the rest."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


# ---- JSON Lines (metrics) ------------------------------------------------------------------

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every readable record of a JSONL file ([] when absent; a torn last line is dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


# ---- embeddings ------------------------------------------------------------------------------

def embedding_file_name(shard_name: str) -> str:
    """`00000.tar` (or .tar.gz, .parquet, .csv) -> `00000.parquet`: one Parquet file per input shard."""
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet", ".csv", ".tsv"):
        if shard_name.endswith(suffix):
            return shard_name[: -len(suffix)] + ".parquet"
    return shard_name + ".parquet"


@dataclass
class EmbedManifest:
    """EMB/embed.json: what was embedded, with what, and how."""

    checkpoint: str
    source: str
    source_format: str
    dtype: str
    dim: int
    count: int
    shards: list[str]
    augment: bool = False
    seconds: float = 0.0
    world_size: int = 1
    schema: str = EMBED_SCHEMA
    extra: dict = field(default_factory=dict)  # e.g. scored_by, skips_rank0

    def to_json(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, data: dict) -> "EmbedManifest":
        known, extra = _known(cls, data)
        known.setdefault("source_format", data.get("format"))
        return cls(**{"schema": EMBED_SCHEMA, **known}, extra=extra)


class Embeddings:
    """An embeddings folder (`safeclip embed`'s output, or a run's per-epoch scores)."""

    MANIFEST = "embed.json"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def files(self) -> list[Path]:
        return parquet_files(self.root)

    def file_for(self, shard_name: str) -> Path:
        return self.root / embedding_file_name(shard_name)

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    def is_finished(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> EmbedManifest:
        return EmbedManifest.from_json(read_json(self.manifest_path, "`safeclip embed` output"))

    def info(self) -> dict:
        """The manifest as a plain dict, or {} when there is none (lenient readers)."""
        try:
            return self.manifest().to_json()
        except (FileNotFoundError, ValueError, TypeError):
            return {}

    def write_manifest(self, manifest: EmbedManifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_json())


# ---- splits ----------------------------------------------------------------------------------

@dataclass
class SplitManifest:
    """PART/split.json: how the split was made and what it holds (see docs/split.md)."""

    epoch: int
    schedule: dict
    ratio: float
    r0: float | None
    r0_source: str | None
    threshold: float | None
    p_clean_cutoff: float | None
    similarity_cutoff: float | None
    counts: dict
    mixture: dict
    fit_sample: int
    seed: int
    ranking: str
    emb: str
    source: str | None
    source_format: str | None
    checkpoint: str | None
    input_files: list[dict]
    warnings: list[str]
    timing_s: dict
    separation: dict = field(default_factory=dict)  # defenses/gmm.py `separation` ({} in older files)
    schema: str = SPLIT_SCHEMA
    extra: dict = field(default_factory=dict)  # a ranking's own section, e.g. "balance"

    @property
    def safe_share(self) -> float:
        return float(self.counts.get("safe_share", 0.0))

    def to_json(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, data: dict) -> "SplitManifest":
        known, extra = _known(cls, data)
        defaults = {"r0": None, "r0_source": None, "threshold": None, "p_clean_cutoff": None,
                    "similarity_cutoff": None, "mixture": {}, "fit_sample": 0, "seed": 0, "ranking": "global",
                    "emb": "", "source": None, "source_format": None, "checkpoint": None, "input_files": [],
                    "warnings": [], "timing_s": {}, "schedule": {}, "ratio": 0.0, "epoch": 0, "counts": {}}
        return cls(**{**defaults, **known}, extra=extra)


class Split:
    """A split folder: safe/ and risky/ partitions of one Parquet file per embedding file."""

    MANIFEST = "split.json"
    PARTITIONS = PARTITIONS

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    def partition_dir(self, partition: str) -> Path:
        if partition not in PARTITIONS:
            raise ValueError(f"unknown partition {partition!r}; choose safe or risky")
        return self.root / partition

    def files(self, partition: str) -> list[Path]:
        return parquet_files(self.partition_dir(partition))

    def is_finished(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> SplitManifest:
        return SplitManifest.from_json(read_json(self.manifest_path, "`safeclip split` output"))

    def info(self) -> dict:
        """split.json as a plain dict, or {} when there is none (lenient readers)."""
        try:
            return read_json(self.manifest_path, "split")
        except (FileNotFoundError, ValueError):
            return {}

    def write_manifest(self, manifest: SplitManifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_json())

    def keys(self, partition: str) -> dict[str, list[str]]:
        """{file stem (= the input shard's embedding file): keys in file order} of one partition."""
        import pyarrow.parquet as pq

        return {path.stem: pq.read_table(path, columns=["key"]).column("key").to_pylist()
                for path in self.files(partition)}

    def key_set(self, partition: str) -> set[str]:
        keys: set[str] = set()
        for part in self.keys(partition).values():
            keys.update(part)
        return keys

    def source(self) -> tuple[str | None, str | None]:
        """(path, format) of the pairs the split was made from."""
        manifest = self.manifest()
        return manifest.source, manifest.source_format


# ---- poisoned sets ---------------------------------------------------------------------------

POISON_MANIFEST = "manifest.parquet"
POISON_SUMMARY = "poison.json"
# One row per pair of a `safeclip poison` output: the ground truth eval, query and report join on `key`.
POISON_COLUMNS = ("key", "attack", "kind", "target_class", "true_class", "source_key", "trigger", "run")


def poison_manifest_path(folder: str | os.PathLike) -> Path:
    """Where `safeclip poison` writes the ground truth of its output folder."""
    return Path(folder) / POISON_MANIFEST


def poison_summary_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / POISON_SUMMARY


def is_poison_manifest(path: str | os.PathLike) -> bool:
    return Path(path).name == POISON_MANIFEST


def find_poison_manifest(poison_dir: str | os.PathLike | None = None,
                         manifest: str | os.PathLike | None = None) -> str:
    """The manifest file from --poison-dir DIR (DIR/manifest.parquet) or --manifest PATH."""
    if poison_dir is not None and manifest is not None:
        raise ValueError("give --poison-dir or --manifest, not both")
    path = Path(manifest) if manifest is not None else poison_manifest_path(poison_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no poison manifest (written by `safeclip poison`)")
    return str(path)


def write_poison_manifest(path: str | os.PathLike, rows: list[dict]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("attack", pa.string()), ("kind", pa.string()),
                        ("target_class", pa.string()), ("true_class", pa.string()),
                        ("source_key", pa.string()), ("trigger", pa.string()), ("run", pa.int32())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_poison_manifest(path: str | os.PathLike) -> list[dict]:
    """Every row of a poison manifest, validated; ValueError with one line otherwise."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise ValueError(f"{path}: not a readable Parquet manifest ({str(exc).splitlines()[0][:160]})")
    needed = {"key", "attack", "kind", "target_class", "source_key", "trigger"}
    missing = needed - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a poison manifest (missing column(s) {', '.join(sorted(missing))})")
    optional = {"true_class", "run"} & set(table.column_names)
    return table.select(sorted(needed | optional)).to_pylist()


def read_poison_summary(folder: str | os.PathLike) -> dict:
    return read_json(poison_summary_path(folder), "`safeclip poison` output")


def write_poison_summary(folder: str | os.PathLike, summary: dict) -> None:
    atomic_write_json(poison_summary_path(folder), summary)


def kinds_by_key(manifest: str | os.PathLike) -> dict[str, str]:
    """key -> clean, noise, or the attack that made the pair."""
    return {r["key"]: r["attack"] if r["kind"] == "poison" else r["kind"] for r in read_poison_manifest(manifest)}


# ---- training runs ---------------------------------------------------------------------------

def side_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """Metrics JSONL and stats JSON beside a warm-up checkpoint: warm.pt -> warm_metrics.jsonl, warm_stats.json."""
    checkpoint = Path(checkpoint)
    stem = checkpoint.with_suffix("") if checkpoint.suffix else checkpoint
    return Path(f"{stem}_metrics.jsonl"), Path(f"{stem}_stats.json")


def warmup_finished(checkpoint: str | os.PathLike) -> bool:
    """Whether a warm-up completed: its stats file says so once the loop ends (the
    checkpoint itself is rewritten after every epoch)."""
    try:
        return bool(json.loads(side_paths(checkpoint)[1].read_text()).get("finished"))
    except (OSError, ValueError):
        return False


class Run:
    """A `safeclip pretrain` run folder."""

    WARMUP = "warmup.pt"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.warmup = self.root / self.WARMUP
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics.jsonl"
        self.stats = self.root / "pretrain_stats.json"
        self.config = self.root / "config.json"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def saved_epochs(self) -> list[int]:
        found = []
        for path in self.checkpoints.glob("epoch_*.pt"):
            match = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        epochs = self.saved_epochs()
        return self.checkpoint(epochs[-1]) if epochs else None

    def scores(self, epoch: int) -> Embeddings:
        return Embeddings(self.root / "scores" / f"epoch={epoch}")

    def split(self, epoch: int) -> Split:
        return Split(self.root / "splits" / f"epoch={epoch}")

    def split_epochs(self) -> list[int]:
        found = []
        for path in (self.root / "splits").glob("epoch=*"):
            match = re.fullmatch(r"epoch=(\d+)", path.name)
            if match and Split(path).is_finished():
                found.append(int(match.group(1)))
        return sorted(found)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics)

    def write_metrics(self, records: list[dict]) -> None:
        write_jsonl(self.metrics, records)

    def read_config(self) -> dict:
        return read_json(self.config, "pretrain run")

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config, config)

    def write_stats(self, stats: dict[str, Any]) -> None:
        atomic_write_json(self.stats, stats)
