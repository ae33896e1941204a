"""Hostile input and unlucky faults (issue 14): the query sandbox, the key contract, no
half-written folder read as a whole one, and one-line failures. The kill -9 checks (crash
consistency, DataLoader workers dying with their parent) are in test_crash.py."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from conftest import CLASS_WORDS, class_image
from emb_synth import mixture_similarities, write_emb
from helpers import encode, make_image, make_pairs, one_line_error
from sanitize.io.artifacts import Embeddings, Split, UnfinishedFolder
from sanitize.io.pairs import DuplicateKeyError, Pair, open_pairs
from sanitize.io.shards import write_pairs
from sanitize.stages.config import EmbedConfig
from sanitize.stages.embed import run_embed
from sanitize.stages.export import export_partition
from sanitize.stages.query import QueryError, connect, run_query
from sanitize.stages.split import split

runner = CliRunner()


def _cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _synthetic_split(root: Path) -> Path:
    """A finished split of 400 synthetic pairs, with sidecars and a poison manifest beside its source."""
    src = root / "src"
    src.mkdir()
    keys = {"00000": [f"k{i:04d}" for i in range(200)], "00001": [f"k{i:04d}" for i in range(200, 400)]}
    for name, shard_keys in keys.items():
        (src / f"{name}.tar").write_bytes(b"")
        pq.write_table(pa.table({"key": shard_keys, "caption": ["c"] * 200, "status": ["success"] * 200}),
                       src / f"{name}.parquet")
    all_keys = keys["00000"] + keys["00001"]
    pq.write_table(pa.table({"key": all_keys, "attack": [None] * 400, "kind": ["clean"] * 400,
                             "target_class": [None] * 400, "source_key": all_keys, "trigger": [None] * 400}),
                   src / "manifest.parquet")
    rng = np.random.default_rng(0)
    emb = write_emb(root / "emb", {n: mixture_similarities(200, rng) for n in keys}, keys=keys, source=str(src))
    split(emb, root / "part", "fraction:0.5")
    return root / "part"


# ---- 1. query: read-only and confined, whatever the SQL ------------------------------------------

HOSTILE = [
    # the statements
    "EXPLAIN ANALYZE COPY (SELECT * FROM pairs) TO 'x.csv'",
    "EXPLAIN ANALYZE COPY (SELECT * FROM pairs) TO 'x.parquet' (FORMAT parquet)",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('https://example.invalid/x.parquet')",
    "EXPLAIN ANALYZE INSTALL httpfs",
    # writing elsewhere, and over the split's own files
    "COPY (SELECT * FROM pairs) TO 'x.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{part}/safe/00000.parquet' (FORMAT csv, USE_TMP_FILE false)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{part}/safe/extra.parquet' (FORMAT parquet)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{part}/split.json' (FORMAT json)",
    "EXPLAIN ANALYZE EXPORT DATABASE 'dump'",
    "ATTACH 'x.db' AS x",
    "SELECT 1; COPY (SELECT 1) TO 'x.csv'",
    # reading outside the split, by any function
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM read_json('/etc/passwd')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM parquet_metadata('{src}/00000.parquet')",
    "SELECT * FROM read_parquet('{part}/safe/*.parquet')",
    "SELECT * FROM read_text('{part}/split.json')",
    "SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')",
    "EXPLAIN ANALYZE SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
    # code and settings
    "INSTALL httpfs",
    "FORCE INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '/tmp/x.duckdb_extension'",
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "SET allowed_directories = ['/']",
    "PRAGMA enable_profiling",
    "CREATE SECRET (TYPE s3, KEY_ID 'a', SECRET 'b')",
]


@pytest.fixture(scope="module")
def sandbox_split(tmp_path_factory):
    return _synthetic_split(tmp_path_factory.mktemp("sandbox"))


@pytest.mark.parametrize("sql", HOSTILE)
def test_query_cannot_write_read_elsewhere_or_load_code(sandbox_split, tmp_path, monkeypatch, sql):
    part = sandbox_split.resolve()
    sql = sql.format(part=part, src=part.parent / "src")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where DuckDB would put extensions
    before = _tree(part.parent)
    result = _cli("query", part, sql)
    one_line_error(result)
    assert _tree(part.parent) == before  # the split and its source untouched
    assert list(tmp_path.iterdir()) == []  # nothing written here, no ~/.duckdb


def test_the_engine_is_the_defence_not_the_statement_check(sandbox_split, tmp_path):
    """Straight to DuckDB, past run_query's statement check: still no write, no read, no way back."""
    import duckdb

    con = connect(sandbox_split)
    for sql in (f"COPY (SELECT * FROM pairs) TO '{tmp_path / 'x.csv'}'",
                f"COPY (SELECT 1 AS a) TO '{sandbox_split.resolve()}/safe/00000.parquet' (FORMAT csv, USE_TMP_FILE false)",
                "SELECT * FROM read_csv('/etc/passwd')", "INSTALL httpfs", "LOAD httpfs",
                f"ATTACH '{tmp_path / 'x.db'}'"):
        with pytest.raises(duckdb.PermissionException):
            con.sql(sql)
    for sql in ("SET enable_external_access = true", "SET lock_configuration = false", "RESET allowed_paths"):
        with pytest.raises(duckdb.Error, match="locked"):
            con.sql(sql)
    assert list(tmp_path.iterdir()) == []
    # ... while the views still read.
    assert con.sql("SELECT count(*) FROM pairs JOIN meta USING (key) JOIN truth USING (key)").fetchall() == [(400,)]
    assert run_query(con, "SELECT count(*) FROM safe").fetchall() == [(200,)]
    with pytest.raises(QueryError, match="not allowed") as info:
        run_query(con, "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'")
    assert "\n" not in str(info.value)


def test_query_out_is_written_atomically(sandbox_split, tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("old result\n")
    # DuckDB fails half way through streaming the result (row 70,000 does not cast).
    failing = ("SELECT i, CAST(CASE WHEN i < 70000 THEN '1' ELSE 'x' END AS INTEGER) AS v "
               "FROM range(100000) t(i)")
    for fmt in ("csv", "parquet", "json"):
        one_line_error(_cli("query", sandbox_split, failing, "--out", out, "--format", fmt), "Conversion Error")
        assert out.read_text() == "old result\n"  # untouched: no truncated file in its place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary file left
    result = _cli("query", sandbox_split, "SELECT key FROM pairs", "--out", out)
    assert result.exit_code == 0 and len(out.read_text().splitlines()) == 401


def test_query_out_on_a_full_disk_leaves_no_file(sandbox_split, tmp_path, monkeypatch):
    from sanitize.io import shards

    _full_disk(monkeypatch, shards, after=1000)
    out = tmp_path / "r.csv"
    result = _cli("query", sandbox_split, "SELECT * FROM pairs", "--out", out)
    one_line_error(result, "r.csv", "no space left on the device")
    assert list(tmp_path.iterdir()) == []


def test_query_limit_is_validated(sandbox_split):
    result = _cli("query", sandbox_split, "SELECT * FROM pairs", "--limit", "-1")
    assert result.exit_code == 2 and "--limit" in result.output and "of 400 rows" not in result.output


# ---- 2. keys are the contract ---------------------------------------------------------------------

def _labelled_pair(key: str, label: int, caption_label: int, seed: int) -> Pair:
    image = class_image(label, np.random.default_rng(seed))
    data = encode(image)
    return Pair(key=key, caption=f"a photo of a {CLASS_WORDS[caption_label]}", image=image, image_bytes=data,
                image_ext="png", meta={"label": label})


def _shared_key_source(root: Path) -> Path:
    """The issue's reproduction: two shards sharing 20 keys, the first copies with wrong-class captions."""
    first = [_labelled_pair(f"{i:04d}", i % 4, (i + 1) % 4, i) for i in range(20)]
    second = [_labelled_pair(f"{i:04d}", i % 4, i % 4, 100 + i) for i in range(20)]
    write_pairs(first + second, root, samples_per_shard=20)
    return root


def test_duplicate_keys_across_shards_are_an_error(tiny_checkpoint, tmp_path):
    src = _shared_key_source(tmp_path / "src")
    result = _cli("embed", src, "-c", tiny_checkpoint, "-o", tmp_path / "emb", "--workers", "0")
    one_line_error(result, "20 key(s) occur more than once", "'0000' in 00000.parquet, 00001.parquet",
                    "--duplicate-keys rename")
    assert not Embeddings(tmp_path / "emb").is_finished()  # no embed.json: nothing downstream reads it


def test_renamed_duplicates_never_export_a_risky_copy_as_safe(tiny_checkpoint, tmp_path):
    src = _shared_key_source(tmp_path / "src")
    result = _cli("embed", src, "-c", tiny_checkpoint, "-o", tmp_path / "emb", "--workers", "0",
                  "--duplicate-keys", "rename")
    assert result.exit_code == 0, result.output
    keys = [k for f in Embeddings(tmp_path / "emb").files() for k in pq.read_table(f).column("key").to_pylist()]
    assert keys == [f"{i:04d}" for i in range(20)] + [f"{i:04d}~2" for i in range(20)]  # n-th occurrence: KEY~n
    assert _cli("split", tmp_path / "emb", "-o", tmp_path / "part", "-r", "fraction:0.5").exit_code == 0
    _check_export_follows_the_split(tmp_path / "part", tmp_path / "out")


def _check_export_follows_the_split(part: Path, out: Path) -> None:
    """Every exported pair is the very pair the safe partition lists (caption included)."""
    safe = pa.concat_tables(pq.read_table(f) for f in Split(part).files("safe"))
    expected = sorted(zip(safe.column("key").to_pylist(), safe.column("caption").to_pylist()))
    result = _cli("export", part, "--out", out, "--partition", "safe")
    assert result.exit_code == 0, result.output
    exported = sorted((p.key, p.caption) for p in open_pairs(str(out), duplicate_keys="rename"))
    assert exported == expected


def test_a_split_with_duplicate_keys_exports_by_identity(tiny_checkpoint, tmp_path, monkeypatch):
    """A split made before keys were checked (both copies of 20 keys in it): export still takes
    each key from the shard whose partition file lists it, never the other copy."""
    import sanitize.stages.embed as embed_stage
    import sanitize.stages.split as split_stage

    src = _shared_key_source(tmp_path / "src")
    monkeypatch.setattr(embed_stage, "check_unique_keys", lambda *a, **k: None)
    monkeypatch.setattr(split_stage.pc, "count_distinct", lambda keys: pa.scalar(len(keys)))
    run_embed(str(src), tiny_checkpoint, tmp_path / "emb", EmbedConfig(workers=0))
    split(tmp_path / "emb", tmp_path / "part", "fraction:0.5")
    monkeypatch.undo()
    safe = {(Path(f).stem, k) for f in Split(tmp_path / "part").files("safe")
            for k in pq.read_table(f).column("key").to_pylist()}
    assert {k for _, k in safe} & {k for s, k in safe if s == "00001"}  # keys with one safe, one risky copy
    _check_export_follows_the_split(tmp_path / "part", tmp_path / "out")
    # ... and split now refuses such embeddings, naming the keys.
    with pytest.raises(ValueError, match="20 key.s. occur more than once"):
        split(tmp_path / "emb", tmp_path / "again", "fraction:0.5")


def test_duplicate_keys_within_a_shard(tmp_path):
    good = encode(make_image(1))
    pq.write_table(pa.table({"key": ["a", "b", "a", "a"], "caption": ["one", "two", "three", "four"],
                             "jpg": [good] * 4, "status": ["success"] * 4}), tmp_path / "00000.parquet")
    with pytest.raises(DuplicateKeyError, match="00000.parquet: key 'a' occurs more than once"):
        list(open_pairs(str(tmp_path)))
    one_line_error(_cli("inspect", tmp_path), "key 'a' occurs more than once", "--duplicate-keys rename")
    pairs = list(open_pairs(str(tmp_path), duplicate_keys="rename"))
    assert [(p.key, p.caption) for p in pairs] == [("a", "one"), ("b", "two"), ("a~2", "three"), ("a~3", "four")]
    assert pairs[2].meta["original_key"] == "a"
    # A folder where two images share a stem: a.png and a.jpg would both be key 'a'.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(good)
    (folder / "a.jpg").write_bytes(encode(make_image(2), "jpg"))
    (folder / "a.txt").write_text("caption")
    with pytest.raises(DuplicateKeyError):
        list(open_pairs(str(folder)))
    # A CSV whose key column repeats.
    (tmp_path / "list.csv").write_text(f"key,filepath,title\nx,{folder / 'a.png'},one\nx,{folder / 'a.png'},two\n")
    with pytest.raises(DuplicateKeyError, match="key 'x'"):
        list(open_pairs(str(tmp_path / "list.csv")))


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unsafe_member_names_are_skipped_and_never_written(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    members = []
    for i, name in enumerate(["../../evil", "/abs/evil", "a/../../evil", "ok\\..\\evil"] + [f"{i:04d}" for i in range(8)]):
        members += [(f"{name}.png", encode(class_image(i % 4, np.random.default_rng(i)))),
                    (f"{name}.txt", f"a photo of a {CLASS_WORDS[i % 4]}".encode())]
    _raw_tar(src / "00000.tar", members)
    source = open_pairs(str(src))
    assert [p.key for p in source] == [f"{i:04d}" for i in range(8)]
    assert source.skips.counts["unsafe member name (absolute or '..' path; pair skipped)"] == 4
    # Through the whole pipeline, no such name reaches an output tar.
    run_embed(str(src), tiny_checkpoint, tmp_path / "emb", EmbedConfig(workers=0))
    split(tmp_path / "emb", tmp_path / "part", "fraction:1")
    export_partition(tmp_path / "part", "safe", tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 24 and all(not n.startswith("/") and ".." not in n and "\\" not in n for n in names)
    # A writer refuses such a key outright.
    bad = make_pairs(1)[0]
    bad.key = "../evil"
    with pytest.raises(ValueError, match="not a safe member name"):
        write_pairs([bad], tmp_path / "w")


# ---- 3. a half-written folder is never read as a whole one ------------------------------------------

def _emb(root: Path, n_shards: int = 4) -> Path:
    rng = np.random.default_rng(1)
    return write_emb(root / "emb", {f"{i:05d}": mixture_similarities(100, rng) for i in range(n_shards)})


def test_split_refuses_unfinished_or_inconsistent_embeddings(tmp_path):
    emb = _emb(tmp_path)
    (emb / "embed.json").rename(tmp_path / "embed.json")  # as a killed embed leaves it
    message = one_line_error(_cli("split", emb, "-o", tmp_path / "p"), "unfinished embeddings",
                              "4 file(s), no embed.json", "rerun the same `safeclip embed`", "--force")
    with pytest.raises(UnfinishedFolder):
        split(emb, tmp_path / "p", "safeclip")
    (tmp_path / "embed.json").rename(emb / "embed.json")
    (emb / "00003.parquet").unlink()  # embed.json lists a file that is not there
    one_line_error(_cli("split", emb, "-o", tmp_path / "p"), "lists 1 file(s) that are not there, e.g. 00003.parquet")
    _emb(tmp_path / "other", n_shards=5)
    (tmp_path / "other" / "emb" / "00004.parquet").rename(emb / "00004.parquet")
    (tmp_path / "other" / "emb" / "00003.parquet").rename(emb / "00003.parquet")
    one_line_error(_cli("split", emb, "-o", tmp_path / "p"), "not listed in embed.json, e.g. 00004.parquet")
    assert message


def test_consumers_refuse_an_unfinished_split(sandbox_split, tmp_path):
    import shutil

    part = tmp_path / "part"
    shutil.copytree(sandbox_split, part)
    (part / "split.json").unlink()  # killed before the manifest, or removed: the 100,000 of 400,000
    for args in (["query", part, "SELECT count(*) FROM pairs"], ["report", part, "--out", tmp_path / "r.html"],
                 ["export", part, "--out", tmp_path / "x"]):
        one_line_error(_cli(*args), "unfinished split", "no split.json", "rerun the `safeclip split` command")
    assert not (tmp_path / "r.html").exists() and not list((tmp_path / "x").glob("*.tar"))
    shutil.copy(sandbox_split / "split.json", part / "split.json")
    (part / "risky" / "00001.parquet").unlink()
    one_line_error(_cli("query", part, "SELECT count(*) FROM pairs"), "risky/00001.parquet is missing")
    with pytest.raises(UnfinishedFolder):
        connect(part)


def test_split_removes_stale_temp_files_of_a_killed_run(tmp_path):
    emb = _emb(tmp_path)
    part = tmp_path / "part"
    dead = 2 ** 22 + 17  # above the default pid_max: no process has it
    for p in ("safe", "risky"):
        (part / p).mkdir(parents=True)
        (part / p / f".00000.parquet.tmp{dead}").write_bytes(b"half a file")
    live = part / "safe" / f".00001.parquet.tmp{os.getppid()}"  # a writer that is still running
    live.write_bytes(b"in progress")
    split(emb, part, "fraction:0.5")
    hidden = sorted(p.name for p in part.rglob(".*"))
    assert hidden == [live.name]
    assert len(Split(part).files("safe")) == 4


def test_embed_refuses_another_checkpoint_in_its_folder(class_pairs_dir, tiny_checkpoint, tmp_path):
    other = tmp_path / "other.pt"
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v
                                for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, other)
    out = tmp_path / "emb"
    config = EmbedConfig(workers=0, batch_size=16)
    seen = []

    def stop_in_second_shard(n):
        seen.append(n)
        if sum(seen) > 56:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_embed(str(class_pairs_dir), tiny_checkpoint, out, config, on_batch=stop_in_second_shard)
    assert [p.name for p in Embeddings(out).files()] == ["00000.parquet"]
    assert (out / "embed.started.json").exists()
    # Resuming with another checkpoint would mix two models' embeddings in one folder.
    one_line_error(_cli("embed", class_pairs_dir, "-c", other, "-o", out, "--workers", "0"),
                    "unfinished embedding made with another checkpoint", "--force")
    one_line_error(_cli("embed", class_pairs_dir, "-c", tiny_checkpoint, "-o", out, "--workers", "0",
                         "--dtype", "float32"), "another --dtype")
    run_embed(str(class_pairs_dir), tiny_checkpoint, out, config)  # the same identity resumes
    manifest = (out / "embed.json").read_bytes()
    assert not (out / "embed.started.json").exists()
    assert json.loads(manifest)["identity"]["checkpoint_sha256"]
    # A finished folder is not rewritten under another checkpoint's name.
    one_line_error(_cli("embed", class_pairs_dir, "-c", other, "-o", out, "--workers", "0"),
                    "already holds finished embeddings made with another checkpoint")
    assert (out / "embed.json").read_bytes() == manifest
    rerun = _cli("embed", class_pairs_dir, "-c", tiny_checkpoint, "-o", out, "--workers", "0")
    assert rerun.exit_code == 0 and (out / "embed.json").read_bytes() == manifest  # same identity: kept
    # --force starts over with the other checkpoint.
    forced = _cli("embed", class_pairs_dir, "-c", other, "-o", out, "--workers", "0", "--force")
    assert forced.exit_code == 0 and "embedded 120 pairs in 3 shard(s)" in forced.output
    assert json.loads((out / "embed.json").read_text())["checkpoint"] == str(other)


# ---- 4. every failure is one line --------------------------------------------------------------------

def _full_disk(monkeypatch, module, after: int) -> None:
    """Make files opened for writing in `module` fail with ENOSPC once `after` bytes are written in all."""
    real_open = open
    written = [0]

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        write = f.write

        def limited(data):
            written[0] += len(data)
            if written[0] > after:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return write(data)

        f.write = limited
        return f

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_disk_full_in_embed_is_one_line_and_leaves_no_partial_file(class_pairs_dir, tiny_checkpoint, tmp_path,
                                                                 monkeypatch):
    from sanitize.io import shards

    _full_disk(monkeypatch, shards, after=60_000)  # room for the first embedding file (~45 KB), not the second
    out = tmp_path / "emb"
    result = _cli("embed", class_pairs_dir, "-c", tiny_checkpoint, "-o", out, "--workers", "0", "--dtype", "float32")
    line = one_line_error(result, "no space left on the device", "free some space and rerun")
    assert ".tmp" not in line  # names the file being written, not its temporary name
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "embed.started.json"]
    monkeypatch.undo()
    assert _cli("embed", class_pairs_dir, "-c", tiny_checkpoint, "-o", out, "--workers", "0",
                "--dtype", "float32").exit_code == 0


def test_disk_full_in_pretrain_and_report_is_one_line(class_pairs_dir, sandbox_split, tmp_path, monkeypatch):
    from sanitize.io import shards

    _full_disk(monkeypatch, shards, after=100_000)  # config.json fits, the first checkpoint does not
    result = _cli("pretrain", class_pairs_dir, "--out", tmp_path / "run", "--preset", "cpu", "--unimodal-epochs", "0",
                  "--clip-epochs", "1", "--epochs", "2", "--batch-size", "32", "--workers", "0")
    one_line_error(result, "run/warmup.pt: no space left on the device")
    assert not [p for p in (tmp_path / "run").rglob(".*")]
    _full_disk(monkeypatch, shards, after=1_000)
    one_line_error(_cli("report", sandbox_split, "--out", tmp_path / "r.html"), "r.html: no space left on the device")
    assert not (tmp_path / "r.html").exists() and not list(tmp_path.glob(".r.html*"))


def test_parquet_image_column_of_strings_is_skipped_and_counted(tiny_checkpoint, tmp_path):
    pq.write_table(pa.table({"key": ["a", "b", "c"], "caption": ["x", "y", "z"],
                             "jpg": ["not bytes", "/path/to/img.jpg", "also text"],
                             "status": ["success"] * 3}), tmp_path / "00000.parquet")
    source = open_pairs(str(tmp_path))
    assert list(source) == [] and source.skips.counts["image column 'jpg' holds str, not bytes"] == 3
    result = _cli("embed", tmp_path, "-c", tiny_checkpoint, "-o", tmp_path / "emb", "--workers", "1")
    assert result.exit_code == 0 and "3 image column 'jpg' holds str, not bytes" in result.output


def test_split_on_a_similarity_list_column_is_one_line(tmp_path):
    emb = _emb(tmp_path, n_shards=1)
    table = pq.read_table(emb / "00000.parquet")
    sims = table.column("similarity").to_pylist()
    table = table.set_column(table.schema.get_field_index("similarity"), "similarity",
                             pa.array([[s] for s in sims], pa.list_(pa.float64())))
    pq.write_table(table, emb / "00000.parquet")
    one_line_error(_cli("split", emb, "-o", tmp_path / "p"), "column similarity is list<",
                    "not a number per pair")


@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_bad_devices_are_one_line(class_pairs_dir, tiny_checkpoint, tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expected = "unknown device 'bogus'" if device == "bogus" else "no CUDA device is available"
    common = ["--device", device]
    one_line_error(_cli("embed", class_pairs_dir, "-c", tiny_checkpoint, "-o", tmp_path / "e", *common), expected)
    one_line_error(_cli("eval", tiny_checkpoint, "--test", class_pairs_dir, "--classes", ",".join(CLASS_WORDS),
                         *common), expected)
    one_line_error(_cli("warmup", class_pairs_dir, "--out", tmp_path / "w.pt", *common), expected)
    one_line_error(_cli("pretrain", class_pairs_dir, "--out", tmp_path / "run", *common), expected)
    assert not (tmp_path / "e").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [
    ["embed", "{src}", "-c", "{ckpt}", "-o", "{tmp}/e", "--batch-size", "0"],
    ["embed", "{src}", "-c", "{ckpt}", "-o", "{tmp}/e", "--batch-size", "-1"],
    ["embed", "{src}", "-c", "{ckpt}", "-o", "{tmp}/e", "--workers", "-1"],
    ["embed", "{src}", "-c", "{ckpt}", "-o", "{tmp}/e", "--duplicate-keys", "merge"],
    ["inspect", "{src}", "--show", "-1"],
    ["split", "{emb}", "-o", "{tmp}/p", "--fit-sample", "0"],
    ["split", "{emb}", "-o", "{tmp}/p", "--seed", "-1"],
    ["split", "{emb}", "-o", "{tmp}/p", "--epoch", "-1"],
    ["export", "{part}", "-o", "{tmp}/x", "--samples-per-shard", "0"],
    ["report", "{part}", "-o", "{tmp}/r.html", "--top", "-1"],
    ["warmup", "{src}", "--out", "{tmp}/w.pt", "--batch-size", "1"],
    ["warmup", "{src}", "--out", "{tmp}/w.pt", "--lr", "nan"],
    ["warmup", "{src}", "--out", "{tmp}/w.pt", "--eda-alpha", "-1"],
    ["warmup", "{src}", "--out", "{tmp}/w.pt", "--temperature", "inf"],
    ["warmup", "{src}", "--out", "{tmp}/w.pt", "--wd", "-1"],
    ["warmup", "{src}", "--out", "{tmp}/w.pt", "--warmup-steps", "-1"],
    ["warmup", "{src}", "--out", "{tmp}/w.pt", "--grad-clip", "0"],
    ["pretrain", "{src}", "--out", "{tmp}/run", "--epochs", "0"],
    ["pretrain", "{src}", "--out", "{tmp}/run", "--fit-sample", "1"],
    ["pretrain", "{src}", "--out", "{tmp}/run", "--keep", "0"],
    ["pretrain", "{src}", "--out", "{tmp}/run", "--lr", "-1"],
    ["pretrain", "{src}", "--out", "{tmp}/run", "--eda-alpha", "2"],
    ["poison", "{src}", "--attack", "badnet", "--target-class", "coat", "--out", "{tmp}/po", "--patch-size", "inf"],
    ["poison", "{src}", "--attack", "wanet", "--target-class", "coat", "--out", "{tmp}/po", "--strength", "nan"],
    ["download", "{tmp}/urls.tsv", "--out", "{tmp}/dl", "--timeout", "0"],
    ["download", "{tmp}/urls.tsv", "--out", "{tmp}/dl", "--retries", "-1"],
    ["eval", "{ckpt}", "--test", "{src}", "--classes", "a,b", "--train", "{src}", "--seed", "-1"],
    ["demo", "--out", "{tmp}/demo", "--unimodal-epochs", "-1"],
    ["demo", "--out", "{tmp}/demo", "--workers", "-1"],
])
def test_numeric_options_are_validated(class_pairs_dir, tiny_checkpoint, sandbox_split, tmp_path, args):
    (tmp_path / "urls.tsv").write_text("url\tcaption\nhttp://127.0.0.1:9/x.png\tx\n")
    values = {"src": class_pairs_dir, "ckpt": tiny_checkpoint, "tmp": tmp_path, "part": sandbox_split,
              "emb": sandbox_split.parent / "emb"}
    result = _cli(*[a.format(**values) for a in args])
    assert result.exit_code in (1, 2), result.output  # 2: typer's usage error for a value out of range
    if result.exit_code == 1:
        one_line_error(result)
    made = {p.name for p in tmp_path.iterdir()} - {"urls.tsv"}
    assert not made, made  # refused before any work
