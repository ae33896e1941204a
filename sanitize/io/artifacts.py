"""The folders safeclip's stages hand to each other: the one place their file names live.

  Embeddings   EMB/NNNNN.parquet, one per input shard, then EMB/embed.json (written last)
  Split        PART/safe/NNNNN.parquet, PART/risky/NNNNN.parquet, then PART/split.json (last)
  Poisoned     SRC/<shards>, SRC/manifest.parquet (ground truth per pair), SRC/poison.json
  Run          RUN/warmup.pt (+ warmup_metrics.jsonl, warmup_stats.json),
               RUN/checkpoints/epoch_KKKK.pt, RUN/scores/epoch=K/ (an Embeddings folder),
               RUN/splits/epoch=K/ (a Split folder), RUN/config.json, RUN/metrics.jsonl,
               RUN/pretrain_stats.json

A folder's manifest is written after every data file, atomically, so a folder with a
manifest is complete; files whose name starts with a dot are temporary and never read
(a writer killed before its rename leaves one; the next run removes it). Readers do
not take a folder's word for it: `Embeddings.check_complete` and `Split.check_complete`
refuse a folder without its manifest, or whose files disagree with it (missing, extra,
other row counts), with a one-line message that says how to resume or start over.
An embedding folder also records what made it (`identity`: checkpoint hash, source,
options), in EMB/embed.started.json from the first file on and in embed.json at the
end, so a rerun never resumes or rewrites it with another checkpoint or source.
The manifests are dataclasses with `to_json`/`from_json`; `from_json` reads every
version this code has written (older ones lack the `schema` field).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .shards import atomic_write_bytes, atomic_write_json, remove_stale_temps

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


class UnfinishedFolder(ValueError):
    """A folder a stage started but did not finish (no manifest, or files missing)."""


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


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a cut or garbled file
        raise ValueError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- keys ------------------------------------------------------------------------------------

def _key_columns(files: list[Path]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return [pq.read_table(f, columns=["key"]).column("key").cast(pa.string()) for f in files]


def _repeated(columns):
    """The keys that occur more than once in these key columns, in first-seen order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not columns:
        return pa.array([], pa.string())
    counts = pc.value_counts(pa.chunked_array([c for col in columns for c in col.chunks], type=pa.string()))
    return counts.filter(pc.greater(counts.field("counts"), 1)).field("values")


def repeated_keys(files: Iterable[str | os.PathLike]) -> set[str]:
    """Every key that occurs more than once across (and within) Parquet files with a `key` column."""
    return set(_repeated(_key_columns([Path(f) for f in files])).to_pylist())


def duplicate_keys(files: Iterable[str | os.PathLike], limit: int = 3) -> tuple[int, list[tuple[str, list[str]]]]:
    """(how many keys repeat, the first `limit` of them with the files holding them)."""
    import pyarrow.compute as pc

    files = [Path(f) for f in files]
    columns = _key_columns(files)
    repeated = _repeated(columns)
    if len(repeated) == 0:
        return 0, []
    first = repeated.slice(0, limit)
    holders: dict[str, list[str]] = {k: [] for k in first.to_pylist()}
    for path, column in zip(files, columns):
        for key in column.filter(pc.is_in(column, value_set=first)).to_pylist():
            holders[key].append(path.name)
    return len(repeated), list(holders.items())


def check_unique_keys(files: Iterable[str | os.PathLike], where: str | os.PathLike, fix: str) -> None:
    """Raise a one-line ValueError naming the first repeated keys, if any."""
    n, examples = duplicate_keys(files)
    if n:
        shown = "; ".join(f"{key!r} in {', '.join(names)}" for key, names in examples)
        raise ValueError(f"{where}: {n:,} key(s) occur more than once ({shown}); keys must be unique in a "
                         f"source, or a risky copy could pass for a safe one: {fix} (docs/reliability.md)")


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
    duplicate_keys: str = "error"  # how the source was read (pairs.DUPLICATE_KEYS)
    identity: dict = field(default_factory=dict)  # what made the files (`embed_identity`); {} for scores
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
    STARTED = "embed.started.json"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def files(self) -> list[Path]:
        return parquet_files(self.root)

    def file_for(self, shard_name: str) -> Path:
        return self.root / embedding_file_name(shard_name)

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def started_path(self) -> Path:
        """EMB/embed.started.json: the identity of a run that has not finished yet."""
        return self.root / self.STARTED

    def is_finished(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> EmbedManifest:
        data = read_json(self.manifest_path, "`safeclip embed` output")
        try:
            return EmbedManifest.from_json(data)
        except TypeError as exc:
            raise ValueError(f"{self.manifest_path}: not an embed manifest ({exc})") from None

    def check_complete(self) -> EmbedManifest:
        """The manifest of a finished folder whose files are the ones it lists, with the
        rows it counts; a one-line error that says how to finish it otherwise."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder of embedding files")
        files = self.files()
        if not self.is_finished():
            if not files and not self.started_path.exists():
                raise FileNotFoundError(f"{self.root}: no embedding files and no {self.MANIFEST}; "
                                        "run `safeclip embed` first")
            raise UnfinishedFolder(
                f"{self.root}: unfinished embeddings ({len(files)} file(s), no {self.MANIFEST}: `safeclip embed` "
                "was stopped or is still running); rerun the same `safeclip embed` command to resume it, "
                "or add --force to start over")
        manifest = self.manifest()
        present = {f.name for f in files}
        missing = [name for name in manifest.shards if name not in present]
        if missing:
            raise UnfinishedFolder(f"{self.root}: {self.MANIFEST} lists {len(missing)} file(s) that are not "
                                   f"there, e.g. {missing[0]}; rerun `safeclip embed` into this folder to write them")
        extra = sorted(present - set(manifest.shards))
        if extra:
            raise ValueError(f"{self.root}: {len(extra)} file(s) not listed in {self.MANIFEST}, e.g. {extra[0]} "
                             "(from another run?); move them out, or embed into a new folder")
        rows = sum(_rows(self.root / name) for name in manifest.shards)
        if rows != manifest.count:
            raise ValueError(f"{self.root}: the files hold {rows:,} pairs but {self.MANIFEST} says {manifest.count:,} "
                             "(changed after embedding?); rerun `safeclip embed` with --force")
        return manifest

    def prepare(self, identity: dict, force: bool = False) -> str:
        """Get the folder ready for an embedding run with `identity`, before any work:
        "new" (nothing there; embed.started.json now records the identity), "resume"
        (an unfinished run with the same identity) or "done" (finished, same identity).
        Another identity is a FileExistsError, unless `force` clears the folder first.
        Temporary files of killed writers are removed either way."""
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root)
        if force:
            for path in self.files():
                path.unlink()
            self.manifest_path.unlink(missing_ok=True)
            self.started_path.unlink(missing_ok=True)
        if self.is_finished():
            manifest = self.manifest()
            differs = identity_difference(manifest.identity or _legacy_identity(manifest), identity)
            if differs:
                raise FileExistsError(f"{self.root}: already holds finished embeddings made with another "
                                      f"{differs}; embed into another --out, or add --force to replace them")
            return "done"
        files = self.files()
        if files or self.started_path.exists():
            try:
                recorded = read_json(self.started_path, "`safeclip embed` run")
            except FileNotFoundError:
                raise FileExistsError(f"{self.root}: holds {len(files)} embedding file(s) but no record of what made "
                                      f"them (no {self.MANIFEST} or {self.STARTED}); embed into another --out, or "
                                      "add --force to replace them") from None
            differs = identity_difference(recorded, identity)
            if differs:
                raise FileExistsError(f"{self.root}: holds an unfinished embedding made with another {differs}; "
                                      "rerun with the same checkpoint, source and options to resume it, or add "
                                      "--force to start over")
            return "resume"
        atomic_write_json(self.started_path, identity)
        return "new"

    def info(self) -> dict:
        """The manifest as a plain dict, or {} when there is none (lenient readers)."""
        try:
            return self.manifest().to_json()
        except (FileNotFoundError, ValueError, TypeError):
            return {}

    def write_manifest(self, manifest: EmbedManifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_json())
        self.started_path.unlink(missing_ok=True)  # embed.json now carries the identity


def _legacy_identity(manifest: EmbedManifest) -> dict:
    """What an embed.json written before identities existed can tell."""
    return {"checkpoint_path": manifest.checkpoint, "source": manifest.source,
            "source_format": manifest.source_format, "dtype": manifest.dtype, "augment": manifest.augment}


IDENTITY_NAMES = {"checkpoint_sha256": "checkpoint", "checkpoint_path": "checkpoint", "source": "source",
                  "source_format": "source format", "dtype": "--dtype", "augment": "--augment", "seed": "--seed",
                  "duplicate_keys": "--duplicate-keys", "csv": "CSV columns"}


def identity_difference(recorded: dict, wanted: dict) -> str:
    """'' when two identities agree on every field both have, else what differs (one line).
    The checkpoint is compared by content hash when both have one, else by path."""
    recorded, wanted = dict(recorded), dict(wanted)
    if recorded.get("checkpoint_sha256") and wanted.get("checkpoint_sha256"):
        recorded.pop("checkpoint_path", None)
        wanted.pop("checkpoint_path", None)
    differs = []
    for name in sorted(set(recorded) & set(wanted)):
        if recorded[name] != wanted[name]:
            old, new = recorded[name], wanted[name]
            if name == "checkpoint_sha256":
                old, new = f"sha256 {str(old)[:12]}…", f"sha256 {str(new)[:12]}…"
            differs.append(f"{IDENTITY_NAMES.get(name, name)} ({old} there, {new} now)")
    return "; ".join(differs)


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
    duplicate_keys: str = "error"  # how the source must be read again (from embed.json)
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
    GROUPS = "groups.parquet"  # near-duplicate groups (key, group) when the split grouped them
    PARTITIONS = PARTITIONS

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def groups_path(self) -> Path:
        return self.root / self.GROUPS

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

    def check_complete(self) -> SplitManifest:
        """The manifest of a finished split whose partition files are the ones it was made
        from, with the rows it counts; a one-line error that says how to finish it otherwise."""
        files = {p: self.files(p) if self.partition_dir(p).is_dir() else [] for p in PARTITIONS}
        n_files = sum(len(f) for f in files.values())
        if not self.is_finished():
            if not n_files and not any(self.partition_dir(p).is_dir() for p in PARTITIONS):
                raise FileNotFoundError(f"{self.root}: no {self.MANIFEST} — not a split; run `safeclip split` first")
            raise UnfinishedFolder(
                f"{self.root}: unfinished split ({n_files} partition file(s), no {self.MANIFEST}: `safeclip split` "
                "was stopped or is still running, or split.json was removed); rerun the `safeclip split` command "
                "that writes it (it starts over; add --force to replace a finished split)")
        manifest = self.manifest()
        names = [f.get("name") for f in manifest.input_files if isinstance(f, dict)]
        for partition in PARTITIONS:
            present = {f.name for f in files[partition]}
            missing = [n for n in names if n not in present]
            if missing or (not names and not present):
                example = missing[0] if missing else "*.parquet"
                raise UnfinishedFolder(f"{self.root}: {partition}/{example} is missing ({len(missing) or 1} file(s)); "
                                       "rerun `safeclip split` with --force")
            extra = sorted(present - set(names)) if names else []
            if extra:
                raise ValueError(f"{self.root}: {partition}/ holds {len(extra)} file(s) this split did not write, "
                                 f"e.g. {extra[0]}; move them out, or rerun `safeclip split` with --force")
            expected = manifest.counts.get(partition)
            if expected is not None:
                rows = sum(_rows(f) for f in files[partition])
                if rows != expected:
                    raise ValueError(f"{self.root}: {partition}/ holds {rows:,} pairs but {self.MANIFEST} says "
                                     f"{expected:,} (changed after splitting?); rerun `safeclip split` with --force")
        return manifest

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
