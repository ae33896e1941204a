"""`safeclip download`: img2dataset end to end on a loopback server, read back with
our reader; bad URL lists and a missing img2dataset give one-line errors."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from helpers import make_image, serve_dir
from sanitize.io.download import (INSTALL_HINT, STATS_PATH, DownloadError, DownloadOptions, download,
                               img2dataset_arguments, parse_extra, resolve_options)
from sanitize.io.pairs import SourceError, open_pairs


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_download_end_to_end_through_the_cli(tmp_path):
    pytest.importorskip("img2dataset", reason="img2dataset is in the dev extra")
    www = tmp_path / "www"
    www.mkdir()
    for i in range(4):  # 32x24: keep_ratio at 16 gives 21x16
        Image.fromarray(np.asarray(make_image(i, 32))[:24]).save(www / f"{i}.png")
    out = tmp_path / "out"
    with serve_dir(www) as base:
        captions = {f"{base}/{i}.png": f"picture number {i}" for i in range(4)}
        urls = dict(captions, **{f"{base}/missing.png": "never served"})
        (tmp_path / "urls.tsv").write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in urls.items()))
        result = _cli("download", str(tmp_path / "urls.tsv"), "--out", str(out), "--image-size", "16",
                      "--threads", "2", "--samples-per-shard", "3", "--timeout", "5")
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    assert summary.startswith("downloaded 4 of 5 URLs (1 failed: 1 HTTP Error 404")
    assert "4 pairs readable, 0 skipped" in summary

    source = open_pairs(str(out))
    pairs = list(source)
    assert source.format == "webdataset" and source.skips.total == 0
    assert sorted((p.meta["url"], p.caption) for p in pairs) == sorted(captions.items())
    assert {p.image.size for p in pairs} == {(21, 16)} and {p.image_ext for p in pairs} == {"jpg"}
    assert len({p.key for p in pairs}) == 4

    stats = json.loads((out / STATS_PATH).read_text())
    assert stats["readable_pairs"] == 4 and stats["img2dataset"]["count"] == 5
    assert stats["img2dataset"]["failed_to_download"] == 1
    assert stats["options"]["caption_col"] == "caption" and stats["options"]["input_format"] == "tsv"
    assert (out / "__len__").read_text().strip() == "4"  # open_clip's dataset size without sizes.json
    # img2dataset resumes by parsing every top-level *.json name as a shard number
    # (main.py: int(name.split("_")[0])): ours must not break a rerun.
    for name in os.listdir(out):
        if name.endswith(".json"):
            int(name.split("_")[0])


def test_missing_img2dataset_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "urls.tsv").write_text("url\tcaption\nhttp://127.0.0.1:9/a.png\ta\n")
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import fails as if not installed
    line = _error_line(_cli("download", str(tmp_path / "urls.tsv"), "--out", str(tmp_path / "out")))
    assert INSTALL_HINT in line and "pip install 'safeclip[download]'" in line
    # A plain .txt list has no captions: the user is warned before anything starts.
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.png\n")
    result = _cli("download", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    warning, error = [line for line in result.output.splitlines() if line.strip()]
    assert warning.startswith("warning: no caption column") and INSTALL_HINT in error


def test_bad_url_lists(tmp_path):
    out = str(tmp_path / "out")
    assert "no such file or folder" in _error_line(_cli("download", str(tmp_path / "nope.tsv"), "--out", out))
    (tmp_path / "urls.tsv").write_text("link\ttext\nhttp://x/a.png\ta\n")
    line = _error_line(_cli("download", str(tmp_path / "urls.tsv"), "--out", out))
    assert "missing column(s) url" in line and "'link', 'text'" in line
    line = _error_line(_cli("download", str(tmp_path / "urls.tsv"), "--out", out, "--url-col", "link",
                            "--caption-col", "caption"))
    assert "missing column(s) caption" in line
    (tmp_path / "urls.dat").write_text("http://x/a.png\n")
    assert "--input-format" in _error_line(_cli("download", str(tmp_path / "urls.dat"), "--out", out))
    line = _error_line(_cli("download", str(tmp_path / "urls.dat"), "--out", out, "--input-format", "xml"))
    assert "unknown input format 'xml'" in line
    line = _error_line(_cli("download", str(tmp_path / "urls.tsv"), "--out", out, "--url-col", "link",
                            "--resize-mode", "stretch"))
    assert "unknown resize mode 'stretch'" in line
    assert "KEY=VALUE" in _error_line(_cli("download", str(tmp_path / "urls.tsv"), "--out", out,
                                           "--extra", "oops"))
    assert not os.path.exists(out)  # nothing started


def test_img2dataset_failure_is_one_line(tmp_path):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.png\n")

    def broken(**kwargs):
        raise RuntimeError("worker died\nlong traceback text")

    with pytest.raises(DownloadError, match=r"^img2dataset failed: RuntimeError: worker died$"):
        download(str(tmp_path / "urls.txt"), str(tmp_path / "out"), downloader=broken)


def test_defaults_and_detection(tmp_path):
    (tmp_path / "urls.txt").write_text("http://x/a.png\n")
    options = resolve_options(str(tmp_path / "urls.txt"), DownloadOptions())
    assert options.input_format == "txt" and options.caption_col is None
    args = img2dataset_arguments("urls.txt", "out", options)
    assert args["output_format"] == "webdataset" and args["enable_wandb"] is False
    assert (args["image_size"], args["resize_mode"], args["resize_only_if_bigger"]) == (256, "keep_ratio", True)
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "part0.csv").write_text("url,caption,extra\nhttp://x/a.png,a,1\n")
    options = resolve_options(str(folder), DownloadOptions(extra=parse_extra(["min_image_size=64", "x=abc"])))
    assert options.input_format == "csv" and options.caption_col == "caption"
    args = img2dataset_arguments(str(folder), "out", options)
    assert args["min_image_size"] == 64 and args["x"] == "abc"
    (tmp_path / "urls.jsonl").write_text('{"link": "http://x/a.png", "caption": "a"}\n')
    options = resolve_options(str(tmp_path / "urls.jsonl"), DownloadOptions(url_col="link"))
    assert options.input_format == "jsonl" and options.caption_col == "caption"
    with pytest.raises(SourceError, match="missing column"):
        resolve_options(str(tmp_path / "urls.jsonl"), DownloadOptions())


def test_png_encoding_passes_a_valid_quality(tmp_path):
    (tmp_path / "urls.txt").write_text("http://x/a.png\n")
    options = resolve_options(str(tmp_path / "urls.txt"), DownloadOptions(encode_format="png"))
    assert 0 <= img2dataset_arguments("u", "o", options)["encode_quality"] <= 9  # img2dataset refuses 95 for png
