"""Every reader on real files of its format, and write -> read round trips."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sanitize.io.pairs import CsvOptions, Skips, open_pairs, safe_key
from sanitize.io.shards import SIDECAR_COLUMNS, write_pairs
from helpers import make_image, make_pairs, pixels, run_img2dataset, serve_dir, write_served_images

# url-list rows: (served file, caption); one 404, one undecodable file, one empty caption.
ROWS = [("0.png", "a zero"), ("1.png", "one thing"), ("missing.png", "gone"), ("bad.png", "broken"),
        ("2.png", ""), ("3.png", "three things"), ("4.png", "four, with a comma")]


@pytest.fixture(scope="module")
def img2dataset_outputs(tmp_path_factory):
    """img2dataset's own webdataset and parquet outputs of the same URL list, served
    on loopback. resize_mode=no + png keeps the served pixels exactly."""
    pytest.importorskip("img2dataset", reason="img2dataset is in the dev extra")
    root = tmp_path_factory.mktemp("i2d")
    served = root / "www"
    write_served_images(served, 5, size=24)
    (served / "bad.png").write_bytes(b"this is not an image")
    outputs = {}
    with serve_dir(served) as base:
        urls = root / "urls.tsv"
        urls.write_text("url\tcaption\n" + "".join(f"{base}/{name}\t{cap}\n" for name, cap in ROWS))
        for fmt in ("webdataset", "parquet"):
            run_img2dataset(urls, root / fmt, output_format=fmt, resize_mode="no", encode_format="png")
            outputs[fmt] = root / fmt
    outputs["www"] = served
    return outputs


def _sidecar_rows(folder) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".parquet"):
            table = pq.read_table(folder / name)
            rows += table.drop([c for c in ("jpg", "png") if c in table.column_names]).to_pylist()
    return rows


def _served_pixels(served, url: str) -> np.ndarray:
    return pixels(Image.open(served / url.rsplit("/", 1)[1]))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_reads_img2dataset_output(img2dataset_outputs, fmt):
    folder, served = img2dataset_outputs[fmt], img2dataset_outputs["www"]
    rows = _sidecar_rows(folder)  # img2dataset's record of every URL, independent of our reader
    assert len(rows) == len(ROWS)
    ok = {r["key"]: r for r in rows if r["status"] == "success"}
    source = open_pairs(str(folder))
    assert source.format == fmt
    pairs = list(source)
    with_caption = {k for k, r in ok.items() if r["caption"]}
    assert {p.key for p in pairs} == with_caption and len(with_caption) == 4
    for pair in pairs:
        row = ok[pair.key]
        assert pair.caption == row["caption"]
        assert pair.meta["url"] == row["url"]
        assert (pair.meta["width"], pair.meta["height"]) == (24, 24)
        np.testing.assert_array_equal(pixels(pair.image), _served_pixels(served, row["url"]))
    # The empty caption is a counted skip; in parquet output the failed rows are too.
    assert source.skips.counts["empty caption"] == 1
    if fmt == "parquet":
        assert source.skips.counts["not downloaded (failed_to_download)"] == 1
        assert source.skips.counts["not downloaded (failed_to_resize)"] == 1
        assert source.skips.total == 3
    else:
        assert source.skips.total == 1
        assert source.count_hint() == len(ok)  # from img2dataset's NNNNN_stats.json


def test_img2dataset_webdataset_as_pattern_and_file_list(img2dataset_outputs):
    folder = img2dataset_outputs["webdataset"]
    tars = sorted(str(folder / n) for n in os.listdir(folder) if n.endswith(".tar"))
    assert len(tars) == 2
    whole = [(p.key, p.caption) for p in open_pairs(str(folder))]
    by_pattern = [(p.key, p.caption) for p in open_pairs(str(folder / "{00000..00001}.tar"))]
    by_list = [(p.key, p.caption) for p in open_pairs(tars)]
    assert whole == by_pattern == by_list


def _write_images(folder, n, ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    images = [make_image(50 + i, 20) for i in range(n)]
    for i, image in enumerate(images):
        image.save(folder / f"img{i}.{ext}")
    return images


def test_tsv_open_clip_defaults(tmp_path):
    images = _write_images(tmp_path / "imgs", 3)
    (tmp_path / "train.tsv").write_text(
        "filepath\ttitle\tlabel\n" + "".join(f"imgs/img{i}.png\tcaption {i}, tab-separated\t{i}\n" for i in range(3)))
    source = open_pairs(str(tmp_path / "train.tsv"))
    pairs = list(source)
    assert source.format == "csv" and source.skips.total == 0
    assert [p.caption for p in pairs] == [f"caption {i}, tab-separated" for i in range(3)]
    assert [p.key for p in pairs] == ["000000000", "000000001", "000000002"]
    assert [p.meta["label"] for p in pairs] == ["0", "1", "2"]
    for pair, image in zip(pairs, images):
        np.testing.assert_array_equal(pixels(pair.image), pixels(image))


def test_comma_csv_with_custom_columns(tmp_path):
    _write_images(tmp_path / "imgs", 2, ext="jpg")
    lines = ["id,text,image,key"] + [f'{i},"caption, {i}",{tmp_path}/imgs/img{i}.jpg,k{i}' for i in range(2)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    source = open_pairs(str(tmp_path / "pairs.csv"), csv_options=CsvOptions(image_column="image",
                                                                             caption_column="text"))
    pairs = list(source)
    assert [p.key for p in pairs] == ["k0", "k1"]
    assert [p.caption for p in pairs] == ["caption, 0", "caption, 1"]
    assert pairs[0].meta["id"] == "0" and pairs[0].image_ext == "jpg"
    # JPEG bytes are kept as they are on disk (lossless copies downstream).
    assert pairs[1].image_bytes == (tmp_path / "imgs" / "img1.jpg").read_bytes()
    np.testing.assert_array_equal(pixels(pairs[0].image), pixels(Image.open(tmp_path / "imgs" / "img0.jpg")))


def test_folder_of_images_and_captions(tmp_path):
    root = tmp_path / "photos"
    images = _write_images(root / "sub", 2)
    (root / "sub" / "img0.txt").write_text("first caption\n")
    (root / "sub" / "img1.txt").write_text("second caption")
    (root / "sub" / "img1.json").write_text(json.dumps({"source": "camera"}))
    make_image(7, 20).save(root / "x.v2.png")
    (root / ".ipynb_checkpoints").mkdir()
    make_image(8, 20).save(root / ".ipynb_checkpoints" / "x-checkpoint.png")  # hidden: not data
    (root / "._x.png").write_bytes(b"macOS resource fork")
    (root / "x.v2.txt").write_text("dotted name")
    source = open_pairs(str(root))
    pairs = {p.key: p for p in source}
    assert source.format == "folder" and source.skips.total == 0
    assert set(pairs) == {"sub/img0", "sub/img1", "x_v2"}  # dots cannot survive webdataset keys
    assert pairs["sub/img0"].caption == "first caption"
    assert pairs["sub/img1"].meta == {"filepath": "sub/img1.png", "source": "camera"}
    assert pairs["x_v2"].meta["filepath"] == "x.v2.png"
    np.testing.assert_array_equal(pixels(pairs["sub/img1"].image), pixels(images[1]))


def test_round_trip_keeps_keys_captions_pixels_meta(tmp_path):
    pairs = make_pairs(7, size=20, seed=3)
    assert write_pairs(pairs, tmp_path / "out", samples_per_shard=3) == 7
    assert sorted(os.listdir(tmp_path / "out")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json",
        "00002.parquet", "00002.tar", "00002_stats.json", "sizes.json"]
    source = open_pairs(str(tmp_path / "out"))
    back = list(source)
    assert source.format == "webdataset" and source.skips.total == 0 and source.count_hint() == 7
    assert [p.key for p in back] == [p.key for p in pairs]
    for original, read in zip(pairs, back):
        assert read.caption == original.caption
        assert read.image_bytes == original.image_bytes and read.image_ext == "png"
        np.testing.assert_array_equal(pixels(read.image), pixels(original.image))
        assert read.meta["label"] == original.meta["label"] and read.meta["url"] == original.meta["url"]
        assert read.meta["key"] == original.key and read.meta["width"] == 20


def test_round_trip_through_every_reader_format(tmp_path):
    """Folder -> shards -> shards again: a second write of what was read is identical."""
    pairs = make_pairs(4, size=16, seed=5, ext="jpg")
    write_pairs(pairs, tmp_path / "a", samples_per_shard=10)
    write_pairs(open_pairs(str(tmp_path / "a")), tmp_path / "b", samples_per_shard=10)
    assert (tmp_path / "a" / "00000.tar").read_bytes() == (tmp_path / "b" / "00000.tar").read_bytes()


def test_our_shards_read_by_webdataset_library(tmp_path):
    wds = pytest.importorskip("webdataset", reason="installed by the train extra: pip install -e '.[dev,train]'")

    pairs = make_pairs(5, size=16, seed=1)
    write_pairs(pairs, tmp_path, samples_per_shard=2)
    dataset = wds.WebDataset(str(tmp_path / "{00000..00002}.tar"), shardshuffle=False).decode("pil").to_tuple(
        "__key__", "jpg;png;jpeg;webp", "txt", "json")  # open_clip's member names
    got = list(dataset)
    assert [g[0] for g in got] == [p.key for p in pairs]
    for (key, image, text, meta), pair in zip(got, pairs):
        assert text == pair.caption and meta["key"] == key
        np.testing.assert_array_equal(pixels(image), pixels(pair.image))


def test_sizes_json_is_what_open_clip_reads(tmp_path):
    from open_clip_train.data import get_dataset_size

    write_pairs(make_pairs(5, size=8), tmp_path, samples_per_shard=2)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    assert get_dataset_size(str(tmp_path / "{00000..00002}.tar")) == (5, 3)
    assert get_dataset_size(str(tmp_path / "{00001..00002}.tar")) == (3, 2)


def test_sidecar_parquet_has_img2dataset_columns_and_one_schema(tmp_path):
    import pyarrow.dataset as ds

    pairs = make_pairs(6, size=8)
    pairs[0].meta["mixed"], pairs[1].meta["mixed"] = 1, "one"  # mixed types: stored as text, not a crash
    pairs[4].meta["mixed"] = 2
    for pair in pairs[2:4]:
        pair.meta["late"] = 7  # first seen in the second shard
    write_pairs(pairs, tmp_path, samples_per_shard=2)
    first = pq.read_table(tmp_path / "00000.parquet")
    assert first.column_names[: len(SIDECAR_COLUMNS)] == list(SIDECAR_COLUMNS)
    assert first.column("status").to_pylist() == ["success", "success"]
    # All-null columns (error_message, exif) are typed, so the shards read as one table.
    files = [str(tmp_path / f"0000{i}.parquet") for i in range(3)]
    assert pq.read_table(files[0]).column("mixed").to_pylist() == ["1", "one"]
    schemas = [pq.read_schema(f) for f in files]
    assert schemas[0].field("mixed").type == schemas[2].field("mixed").type  # fixed by the first shard
    assert all(str(schema.field("error_message").type) == "string" for schema in schemas)
    table = ds.dataset(files, schema=pq.read_schema(files[1])).to_table()
    assert table.column("key").to_pylist() == [p.key for p in pairs]
    assert table.column("label").to_pylist() == [p.meta["label"] for p in pairs]


def test_non_web_image_formats_are_stored_as_png(tmp_path):
    image = make_image(3, 12)
    image.save(tmp_path / "a.bmp")
    image.convert("CMYK").save(tmp_path / "b.tif")  # PNG cannot hold CMYK: stored as RGB
    (tmp_path / "list.tsv").write_text("filepath\ttitle\na.bmp\ta bitmap\nb.tif\ta print scan\n")
    pair, cmyk = list(open_pairs(str(tmp_path / "list.tsv")))
    assert pair.image_ext == "png" and Image.open(io.BytesIO(pair.image_bytes)).format == "PNG"
    assert cmyk.image_ext == "png" and Image.open(io.BytesIO(cmyk.image_bytes)).mode == "RGB"
    write_pairs([pair], tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert sorted(tar.getnames()) == ["000000000.json", "000000000.png", "000000000.txt"]
    (back,) = list(open_pairs(str(tmp_path / "out")))
    np.testing.assert_array_equal(pixels(back.image), pixels(image))


def test_safe_key():
    assert safe_key("a.b c/d.e") == "a_b_c/d_e"
    assert safe_key("000123") == "000123"


def test_inspect_command_summarises_a_source(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    write_pairs(make_pairs(5, size=8), tmp_path, samples_per_shard=2)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path), "--show", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["format"], summary["shards"], summary["pairs"]) == ("webdataset", 3, 5)
    assert [p["key"] for p in summary["first"]] == ["000000", "000001"] and summary["skips"]["total"] == 0
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.output.strip().splitlines()[-1].endswith("3 shard(s), 5 pairs readable; no pairs skipped")


def test_shards_pickle_for_dataloader_workers(tmp_path):
    """DataLoader workers under spawn/forkserver receive shards by pickle."""
    import pickle

    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "list.csv").write_text("img;cap\nimgs/img0.png;zero\nimgs/img1.png;one\n")
    source = open_pairs(str(tmp_path / "list.csv"), csv_options=CsvOptions("img", "cap", ";"))
    (shard,) = pickle.loads(pickle.dumps(source.shards))
    assert [p.caption for p in shard.pairs(Skips())] == ["zero", "one"]
