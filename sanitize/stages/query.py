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
`run_query` accepts only read statements (SELECT, incl. DESCRIBE/SUMMARIZE, and
EXPLAIN), so a query cannot write files, attach databases or load extensions.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.artifacts import POISON_MANIFEST, Split, is_poison_manifest, parquet_files, poison_manifest_path

READ_STATEMENTS = ("SELECT", "EXPLAIN")


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
    return [str(p) for p in parquet_files(folder)]


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
    matches = sorted(glob.glob(path))
    if not matches:
        raise FileNotFoundError(f"{path}: no such file")
    return matches


def locate(part: str | os.PathLike, meta: str | None = None, truth: str | None = None) -> Sources:
    """Find the files behind every view; raise when PART is not a split."""
    root = Path(part)
    if not root.is_dir():
        raise FileNotFoundError(f"{part}: no such split folder")
    split = Split(root)
    safe, risky = _parquet_files(split.partition_dir("safe")), _parquet_files(split.partition_dir("risky"))
    if not safe or not risky:
        raise FileNotFoundError(f"{part}: not a split (no safe/*.parquet and risky/*.parquet); "
                                "run `safeclip split` first")
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
        found.truth = truth
    elif source_dir is not None and poison_manifest_path(source_dir).is_file():
        found.truth = str(poison_manifest_path(source_dir))
    if not found.meta:
        found.notes.append("no `meta` view (no img2dataset sidecar Parquet found; use --meta)")
    if found.truth is None:
        found.notes.append(f"no `truth` view (no poison {POISON_MANIFEST} beside the source; use --truth)")
    return found


def _file_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def connect(part: str | os.PathLike, meta: str | None = None, truth: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views pairs, safe, risky (+ meta, truth when found)."""
    found = locate(part, meta, truth)
    con = duckdb.connect(":memory:")
    con.execute(f"CREATE VIEW safe AS SELECT * FROM read_parquet({_file_list(found.safe)})")
    con.execute(f"CREATE VIEW risky AS SELECT * FROM read_parquet({_file_list(found.risky)})")
    con.execute("CREATE VIEW pairs AS SELECT * FROM safe UNION ALL SELECT * FROM risky")
    if found.meta:
        image_cols = {"jpg", "png", "webp"} & set(_columns(found.meta[0]))
        exclude = f" EXCLUDE ({', '.join(sorted(image_cols))})" if image_cols else ""
        con.execute(f"CREATE VIEW meta AS SELECT *{exclude} FROM read_parquet({_file_list(found.meta)}, "
                    "union_by_name = true)")
    if found.truth:
        con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet({_file_list([found.truth])})")
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()
    return [r[0] for r in rows]


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
        return con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None


def fetch(relation: duckdb.DuckDBPyRelation, batch_rows: int = 65_536) -> pa.RecordBatchReader:
    """Stream a result as Arrow batches; DuckDB's runtime errors become QueryError."""
    try:
        return relation.to_arrow_reader(batch_rows)
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
