"""DuckDB views over a split, for `safeclip query`, the report and the demo.

`connect(PART)` returns an in-memory DuckDB connection with views
  pairs   safe ∪ risky (every pair once, with p_clean, rank, partition)
  safe    PART/safe/*.parquet
  risky   PART/risky/*.parquet
  meta    img2dataset's sidecar Parquet beside the source's .tar shards (or the
          source's own Parquet minus the image bytes), when found
  truth   the poison manifest `safeclip poison` writes (manifest.parquet in the
          source folder), when found
The source is found through PART/split.json, which records the embedding
folder's source path; `meta=`/`truth=` override it. All views join on `key`.

The connection is a sandbox, enforced by DuckDB itself once the views exist: the
views scan Arrow datasets that this module opened (read-only), so DuckDB is given no
path at all; then `enable_external_access=false` (no file or URL, to read or write:
no COPY, ATTACH, EXPORT, read_csv, glob; no extension install or load; autoload and
autoinstall off; no spilling to a temp directory) and the configuration is locked, so
no statement can undo it. (`allowed_paths` is not used: DuckDB 2.0 lets `COPY … TO`
overwrite a file it is allowed to read.)
`run_query` also accepts only one read statement (SELECT, incl. DESCRIBE/SUMMARIZE,
and EXPLAIN) — a friendlier first message, not the defence. `write_result` writes a
result as CSV, JSON or Parquet, to a file atomically.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.artifacts import POISON_MANIFEST, Split, is_poison_manifest, parquet_files, poison_manifest_path
from ..io.shards import atomic_file

READ_STATEMENTS = ("SELECT", "EXPLAIN")
RESULT_FORMATS = ("csv", "json", "parquet")
_HIDDEN = "_safeclip_"  # prefix of the Arrow datasets the views read
# Set at connect, before any view exists; the rest of the sandbox follows the views.
_ENGINE_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                  "allow_community_extensions": False}


class QueryError(Exception):
    """A query DuckDB rejected, or one that is not a read; message is one line."""


@dataclass
class Sources:
    """Which files back which view."""

    safe: list[str]
    risky: list[str]
    meta: list[str] = field(default_factory=list)
    truth: str | None = None
    notes: list[str] = field(default_factory=list)


def _parquet_files(folder: Path) -> list[str]:
    return [os.path.abspath(p) for p in parquet_files(folder)]


def _columns(path: str) -> list[str]:
    return pq.ParquetFile(path).schema_arrow.names


def _source_dir(split_info: dict) -> Path | None:
    source = split_info.get("source")
    if not source:
        return None
    # A brace pattern or a list of .tar files: their folder.
    path = Path(source.split("{")[0]) if "{" in source else Path(source)
    if path.is_file() or path.suffix == ".tar":
        path = path.parent
    return path if path.is_dir() else None


def find_meta(source_dir: Path) -> list[str]:
    """img2dataset sidecars (NNNNN.parquet beside NNNNN.tar), else image Parquet files."""
    files = _parquet_files(source_dir)
    sidecars = [f for f in files if os.path.exists(f[: -len(".parquet")] + ".tar")]
    if sidecars:
        return sidecars
    return [f for f in files if not is_poison_manifest(f) and "key" in _columns(f)]


def _expand(path: str) -> list[str]:
    if os.path.isdir(path):
        return [f for f in _parquet_files(Path(path)) if not is_poison_manifest(f)]
    matches = sorted(os.path.abspath(m) for m in glob.glob(path) if os.path.isfile(m))
    if not matches:
        raise FileNotFoundError(f"{path}: no such file")
    return matches


def locate(part: str | os.PathLike, meta: str | None = None, truth: str | None = None) -> Sources:
    """Find the files behind every view; raise when PART is not a split."""
    root = Path(part)
    if not root.is_dir():
        raise FileNotFoundError(f"{part}: no such split folder")
    split = Split(root)
    split.check_complete()  # a half-written split is never read as a whole one
    safe, risky = _parquet_files(split.partition_dir("safe")), _parquet_files(split.partition_dir("risky"))
    info = split.info()
    found = Sources(safe, risky)
    source_dir = _source_dir(info)
    if meta is not None:
        found.meta = _expand(meta)
    elif source_dir is not None and info.get("source_format") in ("webdataset", "parquet", None):
        found.meta = find_meta(source_dir)
    if truth is not None:
        if not os.path.isfile(truth):
            raise FileNotFoundError(f"{truth}: no such poison manifest")
        found.truth = os.path.abspath(truth)
    elif source_dir is not None and poison_manifest_path(source_dir).is_file():
        found.truth = os.path.abspath(poison_manifest_path(source_dir))
    if not found.meta:
        found.notes.append("no `meta` view (no img2dataset sidecar Parquet found; use --meta)")
    if found.truth is None:
        found.notes.append(f"no `truth` view (no poison {POISON_MANIFEST} beside the source; use --truth)")
    return found


def _dataset(files: list[str], union: bool = False):
    """A read-only Arrow dataset over Parquet files (`union`: columns of every file, types
    promoted, like DuckDB's union_by_name)."""
    import pyarrow.dataset as ds

    schema = None
    if union and len(files) > 1:
        schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    return ds.dataset(files, format="parquet", schema=schema)


def connect(part: str | os.PathLike, meta: str | None = None, truth: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views pairs, safe, risky (+ meta, truth when
    found), sandboxed: DuckDB itself can open no file, URL or extension, and cannot undo that."""
    found = locate(part, meta, truth)
    con = duckdb.connect(":memory:", config=dict(_ENGINE_CONFIG))
    # The views scan Arrow datasets opened here, read-only: DuckDB is given no path at all.
    # (Its `allowed_paths` would still let `COPY … TO` overwrite the very files it may read.)
    sources = {"safe": _dataset(found.safe), "risky": _dataset(found.risky)}
    if found.meta:
        sources["meta"] = _dataset(found.meta, union=True)
    if found.truth:
        sources["truth"] = _dataset([found.truth])
    for name, dataset in sources.items():
        con.register(f"{_HIDDEN}{name}", dataset)
    con.execute(f"CREATE VIEW safe AS SELECT * FROM {_HIDDEN}safe")
    con.execute(f"CREATE VIEW risky AS SELECT * FROM {_HIDDEN}risky")
    con.execute("CREATE VIEW pairs AS SELECT * FROM safe UNION ALL SELECT * FROM risky")
    if found.meta:
        image_cols = {"jpg", "png", "webp"} & set(sources["meta"].schema.names)
        exclude = f" EXCLUDE ({', '.join(sorted(image_cols))})" if image_cols else ""
        con.execute(f"CREATE VIEW meta AS SELECT *{exclude} FROM {_HIDDEN}meta")
    if found.truth:
        con.execute(f"CREATE VIEW truth AS SELECT * FROM {_HIDDEN}truth")
    _sandbox(con)
    return con


def _sandbox(con: duckdb.DuckDBPyConnection) -> None:
    """From here on DuckDB opens no file or URL (to read or to write: COPY, ATTACH,
    EXPORT, read_csv, …), installs or loads no extension, spills nowhere, and refuses
    to change any of this (the configuration is locked)."""
    con.execute("SET allowed_paths = []")
    con.execute("SET allowed_directories = []")
    con.execute("SET temp_directory = ''")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()
    return [r[0] for r in rows if not r[0].startswith(_HIDDEN)]


def one_line(error: Exception) -> str:
    """DuckDB's message without the multi-line caret pointer."""
    lines = [line.strip() for line in str(error).splitlines()]
    keep = []
    for line in lines:
        if line.startswith("LINE "):
            break
        if line:
            keep.append(line)
    return " ".join(keep) or type(error).__name__


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """Check that `sql` is a single read statement and return its (lazy) result."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
    if len(statements) != 1:
        raise QueryError(f"give exactly one SQL statement (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in READ_STATEMENTS:
        raise QueryError(f"only read queries are allowed (SELECT, DESCRIBE, SUMMARIZE, EXPLAIN); got {kind}")
    try:
        relation = con.sql(sql)
    except duckdb.Error as exc:
        raise _query_error(exc) from None
    if relation is None:  # e.g. EXPLAIN ANALYZE of a statement that returns nothing
        raise QueryError("the statement returned no result; give a SELECT")
    return relation


def _query_error(exc: Exception) -> QueryError:
    message = one_line(exc)
    if isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in message:
        message = f"not allowed: {message} (a query reads the split's views only and writes nothing)"
    return QueryError(message)


def fetch(relation: duckdb.DuckDBPyRelation, batch_rows: int = 65_536) -> pa.RecordBatchReader:
    """Stream a result as Arrow batches; DuckDB's runtime errors become QueryError."""
    try:
        return relation.to_arrow_reader(batch_rows)
    except duckdb.Error as exc:
        raise _query_error(exc) from None


def result_format(format: str | None, out: str | os.PathLike | None) -> str:
    """`format` as given, else from --out's extension (csv, json, parquet), else table."""
    suffix = Path(out).suffix.lstrip(".").lower() if out is not None else ""
    fmt = format or (suffix if suffix in RESULT_FORMATS else "table")
    if fmt not in ("table",) + RESULT_FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of table, {', '.join(RESULT_FORMATS)}")
    if fmt == "parquet" and out is None:
        raise ValueError("--format parquet needs --out FILE")
    return fmt


def write_result(reader: pa.RecordBatchReader, fmt: str, out: str | os.PathLike | io.IOBase) -> int:
    """Write a result as CSV, JSON (a list of records) or Parquet; returns the row count.
    `out` is a binary stream, or a path written atomically (whole, or not at all — a
    full disk leaves no truncated file). Errors DuckDB raises while streaming are QueryError."""
    if fmt not in RESULT_FORMATS:
        raise ValueError(f"unknown result format {fmt!r}; choose one of {', '.join(RESULT_FORMATS)}")
    if isinstance(out, (str, os.PathLike)):
        with atomic_file(out) as f:
            return write_result(reader, fmt, f)
    import pyarrow.csv as pacsv

    rows = 0
    try:
        if fmt == "parquet":
            with pq.ParquetWriter(out, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
        elif fmt == "csv":
            with pacsv.CSVWriter(out, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
        else:
            records = [r for batch in reader for r in batch.to_pylist()]
            rows = len(records)
            out.write((json.dumps(records, indent=1, default=str, ensure_ascii=False) + "\n").encode())
    except duckdb.Error as exc:
        raise _query_error(exc) from None
    return rows
