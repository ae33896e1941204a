"""`safeclip query`: SQL over a split with DuckDB."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import typer

from .common import done, fail, out_console, user_errors, warn

FORMATS = ("table", "csv", "json", "parquet")
HELP = "\n\n".join([
    "Run one read-only DuckDB SQL statement over a split.",
    "Views: pairs (safe and risky), safe, risky; meta (img2dataset sidecars) and truth (the poison manifest) "
    "when found beside the source. All join on key.",
    'Example: safeclip query PART "SELECT attack, count(*) FROM risky JOIN truth USING (key) GROUP BY attack"',
    'Example: safeclip query PART "SELECT key, caption FROM risky ORDER BY rank DESC LIMIT 5"',
])


def _table(reader, limit: int) -> tuple[int, object, int]:
    """A rich table of the first `limit` rows; short columns never wrap, long text folds."""
    import pyarrow as pa
    from rich.table import Table

    rows: list[list[str]] = []
    total = 0
    for batch in reader:
        total += batch.num_rows
        if len(rows) < limit:
            rows += [[_cell(v) for v in row.values()] for row in batch.slice(0, limit - len(rows)).to_pylist()]
    table = Table(header_style="bold")
    needed = 1
    for i, f in enumerate(reader.schema):
        width = max([len(f.name)] + [len(r[i]) for r in rows])
        text = pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
        min_width = min(width, 16) if text else width
        table.add_column(f.name, overflow="fold", no_wrap=not text or width <= 12, min_width=min_width)
        needed += min_width + 3
    for row in rows:
        table.add_row(*row)
    return total, table, needed


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def query(
    part: Path = typer.Argument(..., help="Split folder written by `safeclip split`."),
    sql: str = typer.Argument(..., help="One read-only SQL statement (DuckDB dialect)."),
    format: str = typer.Option(None, "--format", "-f", help="table, csv, json or parquet (default: from "
                                                            "--out's extension, else table)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the result here instead of the terminal."),
    limit: int = typer.Option(50, "--limit", help="Rows shown in table format (the count is always exact)."),
    meta: str = typer.Option(None, "--meta", help="img2dataset sidecar Parquet: a folder, file or glob."),
    truth: str = typer.Option(None, "--truth", help="Poison manifest Parquet from `safeclip poison`."),
) -> None:
    """Run DuckDB SQL over a split, read-only (help text: HELP)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from sanitize.stages.query import QueryError, connect, fetch, one_line, run_query

    fmt = format or (out.suffix.lstrip(".").lower() if out and out.suffix.lstrip(".").lower() in FORMATS
                     else "table")
    if fmt not in FORMATS:
        fail(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        fail("--format parquet needs --out FILE")
    with user_errors():
        con = connect(part, meta=meta, truth=truth)
    try:
        reader = fetch(run_query(con, sql))
        if fmt == "table":
            from rich.console import Console

            rows, table, needed = _table(reader, limit)
            if out is None:
                # Too narrow a terminal: let lines wrap rather than squeeze columns to nothing.
                console = out_console if needed <= out_console.width else Console(width=needed)
                console.print(table)
            else:
                with open(out, "w") as f:
                    Console(file=f, width=max(needed, 100)).print(table)
            if rows > limit:
                warn(f"showing {limit} of {rows:,} rows; use --limit, or --format csv/parquet --out FILE")
        elif fmt == "parquet":
            with pq.ParquetWriter(out, reader.schema) as writer:
                rows = 0
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
        elif fmt == "csv":
            sink = open(out, "wb") if out else io.BytesIO()
            with pacsv.CSVWriter(sink, reader.schema) as writer:
                rows = 0
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            if out is None:
                sys.stdout.write(sink.getvalue().decode())
            else:
                sink.close()
        else:
            records = [r for batch in reader for r in batch.to_pylist()]
            rows = len(records)
            text = json.dumps(records, indent=1, default=str, ensure_ascii=False) + "\n"
            if out is None:
                sys.stdout.write(text)
            else:
                out.write_text(text)
    except QueryError as exc:
        fail(str(exc))
    except (pa.ArrowException, OSError) as exc:
        fail(one_line(exc))
    except Exception as exc:  # DuckDB errors raised while streaming the result
        import duckdb
        if isinstance(exc, duckdb.Error):
            fail(one_line(exc))
        raise
    if out is not None:
        done(f"{rows:,} rows -> {out}")


def register(app: typer.Typer) -> None:
    app.command("query", help=HELP)(query)
