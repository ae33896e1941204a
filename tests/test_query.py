"""`safeclip query` / `sanitize.stages.query.connect`: every view, joins, formats, read-only, errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from emb_synth import mixture_similarities, write_emb
from sanitize.stages.query import QueryError, connect, run_query, view_names
from sanitize.stages.split import split

N_PER_SHARD = 300


def _source(tmp_path):
    """A fake img2dataset folder: NNNNN.tar (contents unused here), sidecars, poison manifest."""
    src = tmp_path / "src"
    src.mkdir()
    keys = {}
    for s in range(2):
        name = f"{s:05d}"
        (src / f"{name}.tar").write_bytes(b"")
        keys[name] = [f"{name}{i:04d}" for i in range(N_PER_SHARD)]
        pq.write_table(pa.table({"url": [f"http://x/{k}" for k in keys[name]], "caption": ["c"] * N_PER_SHARD,
                                 "key": keys[name], "status": ["success"] * N_PER_SHARD,
                                 "width": [28] * N_PER_SHARD}), src / f"{name}.parquet")
    all_keys = keys["00000"] + keys["00001"]
    kinds = ["poison"] * 30 + ["noise"] * 10 + ["clean"] * (len(all_keys) - 40)
    attacks = ["badnet"] * 20 + ["tdpa"] * 10 + [None] * (len(all_keys) - 30)
    pq.write_table(pa.table({"key": all_keys, "attack": attacks, "kind": kinds,
                             "target_class": [3 if a else None for a in attacks],
                             "true_class": [1] * len(all_keys), "source_key": all_keys,
                             "trigger": ["patch" if a == "badnet" else None for a in attacks]}),
                   src / "manifest.parquet")
    return src, keys


def _split(tmp_path):
    src, keys = _source(tmp_path)
    rng = np.random.default_rng(0)
    sims = {name: mixture_similarities(N_PER_SHARD, rng) for name in keys}
    sims["00000"][:30] = -0.2  # the poisons: clearly low similarity
    emb = write_emb(tmp_path / "emb", sims, keys=keys, source=str(src))
    part = tmp_path / "part"
    split(emb, part, "fraction:0.5")
    return part, src


def test_connect_exposes_every_view(tmp_path):
    part, src = _split(tmp_path)
    con = connect(part)
    assert view_names(con) == ["meta", "pairs", "risky", "safe", "truth"]
    count = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    assert count("SELECT count(*) FROM pairs") == 600
    assert count("SELECT count(*) FROM safe") == count("SELECT count(*) FROM risky") == 300
    assert count("SELECT count(DISTINCT key) FROM pairs") == 600
    assert count("SELECT count(*) FROM safe WHERE partition <> 'safe'") == 0
    assert count("SELECT max(rank) FROM safe") < count("SELECT min(rank) FROM risky")
    assert count("SELECT count(*) FROM pairs JOIN meta USING (key)") == 600
    assert count("SELECT count(*) FROM meta WHERE width = 28") == 600
    rows = con.execute("SELECT attack, count(*) FROM risky JOIN truth USING (key) "
                       "WHERE attack IS NOT NULL GROUP BY attack ORDER BY attack").fetchall()
    assert rows == [("badnet", 20), ("tdpa", 10)]


def test_explicit_paths_and_missing_sidecars(tmp_path):
    part, src = _split(tmp_path)
    moved = tmp_path / "elsewhere.parquet"
    (src / "manifest.parquet").rename(moved)
    con = connect(part)
    assert "truth" not in view_names(con) and "meta" in view_names(con)
    con = connect(part, truth=str(moved), meta=str(src / "00001.parquet"))
    assert con.execute("SELECT count(*) FROM truth").fetchone()[0] == 600
    assert con.execute("SELECT count(*) FROM meta").fetchone()[0] == 300
    with pytest.raises(FileNotFoundError):
        connect(part, truth=str(tmp_path / "nope.parquet"))
    with pytest.raises(FileNotFoundError, match="not a split"):
        connect(src)


def test_meta_for_parquet_sources_drops_image_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["x", "y"], "jpg": [b"\xff", None],
                             "status": ["success", "failed"]}), src / "00000.parquet")
    emb = write_emb(tmp_path / "emb", {"00000": np.array([0.1, 0.3], np.float32)}, keys={"00000": ["a", "b"]},
                    source=str(src), source_format="parquet")
    split(emb, tmp_path / "part", "fraction:0.5")
    con = connect(tmp_path / "part")
    cols = [r[0] for r in con.execute("DESCRIBE meta").fetchall()]
    assert "jpg" not in cols and "status" in cols


def test_only_read_statements(tmp_path):
    part, _ = _split(tmp_path)
    con = connect(part)
    assert run_query(con, "SELECT count(*) FROM pairs;").fetchall() == [(600,)]
    assert run_query(con, "DESCRIBE pairs").fetchall()
    for sql, message in [(f"COPY safe TO '{tmp_path / 'x.csv'}'", "only read"),
                         ("CREATE TABLE t AS SELECT 1", "only read"), ("DROP VIEW safe", "only read"),
                         ("SELECT 1; SELECT 2", "exactly one"), ("SELEC 1", "syntax error"),
                         ("SELECT * FROM nowhere", "does not exist")]:
        with pytest.raises(QueryError, match=message) as info:
            run_query(con, sql)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x.csv").exists()


def test_cli_formats(tmp_path):
    part, _ = _split(tmp_path)
    runner = CliRunner()
    sql = "SELECT key, rank FROM risky ORDER BY rank DESC LIMIT 3"
    r = runner.invoke(app, ["query", str(part), sql])
    assert r.exit_code == 0, r.output
    assert "rank" in r.output and "599" in r.output
    r = runner.invoke(app, ["query", str(part), sql, "--format", "csv"])
    lines = r.output.strip().splitlines()
    assert lines[0] == '"key","rank"' and len(lines) == 4 and lines[1].endswith(",599")
    r = runner.invoke(app, ["query", str(part), sql, "--format", "json"])
    records = json.loads(r.output)
    assert [x["rank"] for x in records] == [599, 598, 597]
    out = tmp_path / "r.parquet"
    r = runner.invoke(app, ["query", str(part), "SELECT * FROM pairs JOIN truth USING (key)", "--out", str(out)])
    assert r.exit_code == 0 and "600 rows" in r.output
    table = pq.read_table(out)
    assert table.num_rows == 600 and "attack" in table.schema.names
    r = runner.invoke(app, ["query", str(part), "SELECT * FROM pairs", "--limit", "5"])
    assert r.exit_code == 0 and "5 of 600" in r.output


def test_cli_errors_are_one_line(tmp_path):
    part, _ = _split(tmp_path)
    runner = CliRunner()
    for args in ([str(part), "SELECT * FROM nope"], [str(part), "SELECT 'a'::INT"],
                 [str(part), "COPY safe TO 'x.csv'"], [str(part), "SELECT 1", "--format", "xml"],
                 [str(part), "SELECT 1", "--format", "parquet"], [str(tmp_path / "none"), "SELECT 1"]):
        r = runner.invoke(app, ["query", *args])
        assert r.exit_code != 0, args
        assert "Traceback" not in r.output and r.output.strip().startswith("error:")
        assert len(r.output.strip().splitlines()) == 1, r.output
