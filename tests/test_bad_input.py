"""Bad input: a one-line message and a non-zero exit for whole-source problems, a
counted skip with its reason for per-pair problems, and nothing else lost."""

from __future__ import annotations

import gzip
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from helpers import encode, make_image, make_pairs, one_line_error
from sanitize.io.pairs import CsvOptions, SourceError, open_pairs
from sanitize.io.shards import write_pairs


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _pair_members(key: str, caption: bytes, image: bytes | None = None) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image if image is not None else encode(make_image(len(key)))), (f"{key}.txt", caption)]


# ---- whole-source problems -----------------------------------------------------------

def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(SourceError, match="no such file or folder"):
        open_pairs(missing)
    one_line_error(_cli("inspect", missing), "nope", "no such file or folder")
    one_line_error(_cli("inspect", str(tmp_path / "{00000..00001}.tar")), "00000.tar", "no such file")


def test_unknown_format(tmp_path):
    write_pairs(make_pairs(2, size=8), tmp_path)
    one_line_error(_cli("inspect", str(tmp_path), "--format", "xml"), "unknown format 'xml'", "webdataset")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(_cli("inspect", str(tmp_path / "notes.txt")), "unknown source format", "--format")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(_cli("inspect", str(empty)), "no pairs found")


def test_forcing_a_wrong_format(tmp_path):
    shards = tmp_path / "shards"
    write_pairs(make_pairs(2, size=8), shards)
    (tmp_path / "list.tsv").write_text("filepath\ttitle\n")
    one_line_error(_cli("inspect", str(shards), "--format", "parquet"), "no parquet files with an image column")
    one_line_error(_cli("inspect", str(shards), "--format", "csv"), "must be a file")
    one_line_error(_cli("inspect", str(tmp_path / "list.tsv"), "--format", "webdataset"), "not a tar file")
    one_line_error(_cli("inspect", str(shards / "00000.tar"), "--format", "folder"), "must be a folder")
    # The right format still reads everything.
    assert len(list(open_pairs(str(shards)))) == 2


def test_missing_csv_column(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(make_image(1)))
    (tmp_path / "list.csv").write_text("image,caption\na.png,a cat\n")
    one_line_error(_cli("inspect", str(tmp_path / "list.csv")), "missing column(s) filepath, title",
                    "'image', 'caption'")
    result = _cli("inspect", str(tmp_path / "list.csv"), "--image-column", "image", "--caption-column", "caption")
    assert result.exit_code == 0 and "1 pairs readable" in result.output


# ---- per-pair problems in a tar ---------------------------------------------------------

def test_unreadable_empty_and_non_utf8_in_a_tar(tmp_path):
    good = encode(make_image(9))
    _tar(tmp_path / "00000.tar",
         _pair_members("k0", b"fine one")
         + _pair_members("k1", b"broken image", image=b"\x89PNG not really")
         + _pair_members("k2", b"cut image", image=good[: len(good) // 2])
         + _pair_members("k3", b"   \n")
         + _pair_members("k4", b"caf\xe9 latin-1")
         + [("k5.txt", b"caption without image")]
         + _pair_members("k6", b"fine two"))
    source = open_pairs(str(tmp_path))
    assert [(p.key, p.caption) for p in source] == [("k0", "fine one"), ("k6", "fine two")]
    assert dict(source.skips.counts) == {"unreadable image": 2, "empty caption": 1, "non-UTF-8 caption": 1,
                                         "missing image": 1}
    assert source.skips.examples["non-UTF-8 caption"] == ["00000.tar:k4"]
    result = _cli("inspect", str(tmp_path))
    assert result.exit_code == 0
    assert "2 pairs readable; skipped 5 pairs: 2 unreadable image" in " ".join(result.output.split())


def _truncate(path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


def _offsets(path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


@pytest.mark.parametrize("cut", ["in image data", "at a header", "in a header", "end marker only"])
def test_truncated_tar_keeps_pairs_before_the_cut(tmp_path, cut):
    pairs = make_pairs(8, size=12)
    write_pairs(pairs, tmp_path, samples_per_shard=5)  # 00000.tar: pairs 0-4, 00001.tar: pairs 5-7
    tar = tmp_path / "00000.tar"
    members = _offsets(tar)
    third = members["000003.png"]
    size = {"in image data": third.offset_data + third.size // 2,
            "at a header": third.offset,
            "in a header": third.offset + 100,
            "end marker only": members["000004.json"].offset_data + 512}[cut]
    _truncate(tar, size)
    source = open_pairs(str(tmp_path))
    got = [p.key for p in source]
    kept = 5 if cut == "end marker only" else 3
    assert got == [p.key for p in pairs[:kept]] + [p.key for p in pairs[5:]]  # nothing else lost
    counts = source.skips.counts
    # The shard's _stats.json says it held 5 pairs, so every lost one is counted.
    assert counts["truncated tar (rest of shard lost)"] + counts["truncated tar (pair cut off)"] == 5 - kept
    assert counts["truncated tar (pair cut off)"] == (1 if cut == "in image data" else 0)  # 000003 lost its image
    reasons = [r for r in counts if r.startswith("truncated tar") and r != "truncated tar (pair cut off)"]
    assert len(reasons) == 1 and source.skips.examples[reasons[0]] == ["00000.tar"]  # the cut is always noted
    result = _cli("inspect", str(tmp_path))
    assert result.exit_code == 0 and "truncated tar" in result.output


def test_truncated_gzipped_tar(tmp_path):
    write_pairs(make_pairs(6, size=12), tmp_path / "plain", samples_per_shard=6)
    data = gzip.compress((tmp_path / "plain" / "00000.tar").read_bytes())
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    source = open_pairs(str(tmp_path / "gz"))
    got = list(source)
    assert 0 < len(got) < 6
    assert source.skips.counts["truncated tar (rest of shard lost)"] >= 1


def test_unreadable_shard_among_good_ones(tmp_path):
    write_pairs(make_pairs(4, size=8), tmp_path, samples_per_shard=2)
    (tmp_path / "00001.tar").write_bytes(b"")  # e.g. a copy that died at once
    source = open_pairs(str(tmp_path))
    assert [p.key for p in source] == ["000000", "000001"]
    assert source.skips.counts["unreadable tar shard (all its pairs)"] == 2  # count from 00001_stats.json


def test_tar_with_scattered_members(tmp_path):
    """`tar cf` without --sort=name can scatter a key's members: pairs are still found."""
    images = {k: encode(make_image(i)) for i, k in enumerate(["k0", "k1", "k2"])}
    members = ([(f"{k}.png", data) for k, data in images.items()]
               + [(f"{k}.txt", f"caption {k}".encode()) for k in images]
               + [(f"{k}.json", b"{}") for k in images])
    _tar(tmp_path / "00000.tar", members)
    source = open_pairs(str(tmp_path))
    pairs = list(source)
    assert sorted((p.key, p.caption) for p in pairs) == [(k, f"caption {k}") for k in images]
    for pair in pairs:
        assert pair.image_bytes == images[pair.key]
    # Metadata that comes after its pair was emitted is ignored, and says so.
    assert dict(source.skips.counts) == {"tar member after its pair was read (ignored, pair kept)": 3}


def test_bad_json_metadata_keeps_the_pair(tmp_path):
    _tar(tmp_path / "00000.tar", _pair_members("k0", b"fine") + [("k0.json", b"{not json")])
    source = open_pairs(str(tmp_path))
    assert [p.meta for p in source] == [{}]
    assert dict(source.skips.counts) == {"unreadable json metadata (pair kept)": 1}


# ---- CSV ------------------------------------------------------------------------------

def test_non_utf8_caption_in_a_csv(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(encode(make_image(i)))
    rows = [b"filepath\ttitle\tnote", b"0.png\tfirst\tok", b"1.png\tcaf\xe9 au lait\tok",
            b"2.png\tthird\tna\xefve note", b"3.png\tfourth\tok"]
    (tmp_path / "list.tsv").write_bytes(b"\n".join(rows) + b"\n")
    source = open_pairs(str(tmp_path / "list.tsv"))
    pairs = list(source)
    assert [p.caption for p in pairs] == ["first", "third", "fourth"]  # read on past the bad row
    assert dict(source.skips.counts) == {"non-UTF-8 caption": 1}
    assert source.skips.examples["non-UTF-8 caption"] == ["list.tsv:line 3"]
    assert "note" not in pairs[1].meta and pairs[0].meta["note"] == "ok"  # undecodable extra field dropped
    write_pairs(pairs, tmp_path / "out")  # and what was read can be written
    assert len(list(open_pairs(str(tmp_path / "out")))) == 3


def test_csv_per_row_problems(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(make_image(1)))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    (tmp_path / "list.csv").write_bytes(
        "\ufefffilepath,title\n"  # a spreadsheet's byte-order mark must not hide the first column
        "a.png,good\n"
        "missing.png,no file\n"
        ",no path\n"
        "bad.png,unreadable\n"
        "a.png,\n"
        "\n"
        "a.png,good again\n".encode())
    source = open_pairs(str(tmp_path / "list.csv"))
    assert [(p.key, p.caption) for p in source] == [("000000000", "good"), ("000000005", "good again")]
    assert dict(source.skips.counts) == {"image file not found": 1, "missing image path": 1,
                                         "unreadable image": 1, "empty caption": 1}


def test_malformed_csv_row_is_counted(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(make_image(1)))
    huge = "x" * 200_000  # past the csv module's field size limit
    (tmp_path / "list.tsv").write_text(f"filepath\ttitle\na.png\tfirst\na.png\t{huge}\na.png\tlast\n")
    source = open_pairs(str(tmp_path / "list.tsv"))
    assert [p.caption for p in source] == ["first", "last"]
    (reason,) = source.skips.counts
    assert reason.startswith("malformed CSV row") and source.skips.total == 1


def test_csv_options_mismatch_names_the_header(tmp_path):
    (tmp_path / "list.tsv").write_text("path,text\n")
    with pytest.raises(SourceError, match=r"missing column\(s\) filepath, title; header has 'path,text'"):
        open_pairs(str(tmp_path / "list.tsv"))
    with pytest.raises(SourceError, match="missing column"):
        open_pairs(str(tmp_path / "list.tsv"), csv_options=CsvOptions("path", "txt", ","))


# ---- img2dataset parquet --------------------------------------------------------------

def test_parquet_failed_and_null_rows(tmp_path):
    good = encode(make_image(3))
    table = pa.table({
        "caption": ["ok", "failed", "null bytes", "garbage", "also ok"],
        "url": [f"http://x/{i}" for i in range(5)],
        "key": ["000000", "000001", "000002", "000003", "000004"],
        "status": ["success", "failed_to_download", "success", "success", "success"],
        "error_message": [None, "HTTP Error 404", None, None, None],
        "jpg": [good, None, None, b"garbage", good],
    })
    pq.write_table(table, tmp_path / "00000.parquet")
    source = open_pairs(str(tmp_path))
    assert source.format == "parquet"
    assert [(p.key, p.caption) for p in source] == [("000000", "ok"), ("000004", "also ok")]
    assert dict(source.skips.counts) == {"not downloaded (failed_to_download)": 1, "missing image": 1,
                                         "unreadable image": 1}
    assert source.skips.examples["missing image"] == ["00000.parquet:000002"]


# ---- folders ----------------------------------------------------------------------------

def test_folder_image_without_caption(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(encode(make_image(i)))
    (tmp_path / "0.txt").write_text("zero")
    (tmp_path / "2.txt").write_bytes(b"\xff\xfe bad")
    source = open_pairs(str(tmp_path))
    assert [p.key for p in source] == ["0"]
    assert dict(source.skips.counts) == {"missing caption": 1, "non-UTF-8 caption": 1}
