"""`safeclip query`: SQL over a split with DuckDB."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import typer

from .common import done, fail, out_console, user_errors, warn

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
    limit: int = typer.Option(50, "--limit", min=0, help="Rows shown in table format (the count is always exact)."),
    meta: str = typer.Option(None, "--meta", help="img2dataset sidecar Parquet: a folder, file or glob."),
    truth: str = typer.Option(None, "--truth", help="Poison manifest Parquet from `safeclip poison`."),
) -> None:
    """Run DuckDB SQL over a split, read-only (help text: HELP)."""
    from sanitize.io.shards import atomic_file
    from sanitize.stages.query import QueryError, connect, fetch, one_line, result_format, run_query, write_result

    with user_errors():
        fmt = result_format(format, out)
        con = connect(part, meta=meta, truth=truth)
    try:
        with user_errors():
            reader = fetch(run_query(con, sql))
            if fmt == "table":
                from rich.console import Console

                if out is None:
                    rows, table, needed = _table(reader, limit)
                    # Too narrow a terminal: let lines wrap rather than squeeze columns to nothing.
                    console = out_console if needed <= out_console.width else Console(width=needed)
                    console.print(table)
                else:
                    with atomic_file(out, "w") as f:
                        rows, table, needed = _table(reader, limit)
                        Console(file=f, width=max(needed, 100)).print(table)
                if rows > limit:
                    warn(f"showing {limit} of {rows:,} rows; use --limit, or --format csv/parquet --out FILE")
            elif out is None:
                sink = io.BytesIO()
                rows = write_result(reader, fmt, sink)
                sys.stdout.write(sink.getvalue().decode())
            else:
                rows = write_result(reader, fmt, out)  # atomically: whole, or no file
    except QueryError as exc:
        fail(str(exc))
    except Exception as exc:  # DuckDB and Arrow errors raised while streaming the result
        import duckdb
        import pyarrow as pa

        if isinstance(exc, (duckdb.Error, pa.ArrowException)):
            fail(one_line(exc))
        raise
    if out is not None:
        done(f"{rows:,} rows -> {out}")


def register(app: typer.Typer) -> None:
    app.command("query", help=HELP)(query)
