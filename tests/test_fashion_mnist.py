"""Captioned Fashion-MNIST: idx reading, captions, noise, keys, the bundled sample."""

from __future__ import annotations

import fnmatch
import gzip
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from sanitize.io import fashion_mnist as fm
from sanitize.io.pairs import open_pairs

DEBIAN = Path(fm.DEBIAN_DIR)
HAVE_DEBIAN = (DEBIAN / "train-images-idx3-ubyte.gz").exists()
REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def fake_source(tmp_path: Path) -> Path:
    """idx files in Fashion-MNIST's naming: 200 train / 50 test random images."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, n in (("train", 200), ("t10k", 50)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def sidecars(folder: Path, columns: list[str]) -> dict:
    tables = [pq.read_table(f, columns=columns) for f in sorted(folder.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pydict()


def read_all(folder: Path) -> list:
    source = open_pairs(str(folder))
    pairs = list(source)
    assert source.skips.total == 0, source.skips.summary()
    return pairs


def test_load_idx_roundtrip_and_truncation(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x.gz", array)
    assert fm.read_idx_header(tmp_path / "x.gz") == (7, 28, 28)
    assert np.array_equal(fm.load_idx(tmp_path / "x.gz"), array)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        fm.load_idx(tmp_path / "short")


def test_captions_vary_and_name_their_class() -> None:
    assert len(fm.CAPTION_TEMPLATES) >= 15
    assert set(fm.CLASS_SYNONYMS) == set(fm.FASHION_MNIST_CLASSES)
    rng = np.random.default_rng(0)
    for class_id, name in enumerate(fm.FASHION_MNIST_CLASSES):
        assert len(fm.CLASS_SYNONYMS[name]) >= 4
        captions = [fm.caption_for(class_id, rng) for _ in range(300)]
        assert len(set(captions)) >= 30
        words = fm.class_words(name)
        assert all(any(w in c for w in words) for c in captions), name
    again = [fm.caption_for(3, np.random.default_rng(7)) for _ in range(2)]
    assert again[0] == again[1]  # seeded, not global state


def test_noise_swaps_exact_share_for_other_class() -> None:
    labels = np.arange(1000) % 10
    captions, caption_labels, noise = fm.make_captions(labels, 0.03, np.random.default_rng(0))
    assert noise.sum() == 30
    assert np.all(caption_labels[noise] != labels[noise])
    assert np.all(caption_labels[~noise] == labels[~noise])
    with pytest.raises(ValueError):
        fm.make_captions(labels, 1.5, np.random.default_rng(0))


def test_build_keys_meta_and_determinism(fake_source: Path, tmp_path: Path) -> None:
    stats = fm.build(tmp_path / "a", fake_source, noise=0.1, seed=3, samples_per_shard=64)
    assert stats["splits"]["train"]["pairs"] == 200 and stats["splits"]["test"]["pairs"] == 50
    train, test = read_all(tmp_path / "a" / "train"), read_all(tmp_path / "a" / "test")
    assert [p.key for p in train] == [f"{i:09d}" for i in range(200)]
    assert [p.key for p in test] == [f"test-{i:09d}" for i in range(50)]
    images = fm.load_idx(fake_source / "train-images-idx3-ubyte.gz")
    for pair in train[:20]:
        i = pair.meta["source_index"]
        assert np.array_equal(np.asarray(pair.image), images[i]) and pair.image.mode == "L"
        assert pair.meta["label"] == i % 10 and pair.meta["class_name"] == fm.FASHION_MNIST_CLASSES[i % 10]
        assert pair.meta["split"] == "train"
    noisy = [p for p in train if p.meta["noise"]]
    assert len(noisy) == 20 and all(p.meta["caption_label"] != p.meta["label"] for p in noisy)
    assert not any(p.meta["noise"] for p in test)  # evaluation captions stay truthful
    # Ground truth reaches the sidecar parquet too.
    table = pq.read_table(tmp_path / "a" / "train" / "00000.parquet").to_pydict()
    assert {"label", "class_name", "noise", "source_index"} <= set(table)

    fm.build(tmp_path / "b", fake_source, noise=0.1, seed=3, samples_per_shard=64)
    for f in sorted((tmp_path / "a" / "train").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "train" / f.name).read_bytes(), f.name
    fm.build(tmp_path / "c", fake_source, noise=0.1, seed=4, samples_per_shard=64)
    assert [p.caption for p in read_all(tmp_path / "c" / "train")] != [p.caption for p in train]


def test_subset_is_balanced_and_keeps_keys(fake_source: Path, tmp_path: Path) -> None:
    fm.build(tmp_path / "s", fake_source, noise=0.0, train_size=50, test_size=20)
    train = read_all(tmp_path / "s" / "train")
    assert len(train) == 50
    assert set(Counter(p.meta["label"] for p in train).values()) == {5}
    assert all(p.key == f"{p.meta['source_index']:09d}" for p in train)


def test_cli_builds_and_rejects_bad_input(fake_source: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "fashion-mnist", "--out", str(tmp_path / "o"), "--source",
                                 str(fake_source), "--train-size", "100", "--test-size", "10", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "100 train + 10 test pairs" in result.output
    assert (tmp_path / "o" / "_stats.json").exists()
    # Same output folder again: refused, nothing overwritten.
    before = (tmp_path / "o" / "train" / "00000.tar").read_bytes()
    again = runner.invoke(app, ["data", "fashion-mnist", "--out", str(tmp_path / "o"), "--source", str(fake_source)])
    assert again.exit_code != 0 and "not empty" in again.output and "Traceback" not in again.output
    assert (tmp_path / "o" / "train" / "00000.tar").read_bytes() == before
    missing = runner.invoke(app, ["data", "fashion-mnist", "--out", str(tmp_path / "m"), "--source",
                                  str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "idx file not found" in missing.output
    assert len(missing.output.strip().splitlines()) == 1


def test_bundled_sample_is_readable_and_packaged() -> None:
    root = fm.sample_path()
    assert (root / "LICENSE.md").read_text().count("Zalando SE") >= 1
    train, test = read_all(root / "train"), read_all(root / "test")
    assert len(train) == fm.SAMPLE_TRAIN and len(test) == fm.SAMPLE_TEST
    assert set(Counter(p.meta["label"] for p in train).values()) == {fm.SAMPLE_TRAIN // 10}
    assert sum(p.meta["noise"] for p in train) == round(fm.SAMPLE_NOISE * fm.SAMPLE_TRAIN)
    assert not {p.key for p in train} & {p.key for p in test}
    files = [f for f in root.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 5_000_000
    # pyproject's package-data globs must cover every sample file (setuptools
    # matches them relative to the package folder).
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sanitize"]
    package = root.parents[1]
    for f in files:
        rel = f.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel


@pytest.mark.skipif(not HAVE_DEBIAN, reason="needs Debian's dataset-fashion-mnist")
def test_bundled_sample_matches_its_regeneration_command(tmp_path: Path) -> None:
    """The shipped pairs are exactly what the documented command makes (content, not
    bytes: the sidecar format may evolve with the writer)."""
    fm.write_sample(tmp_path / "sample")
    for split in ("train", "test"):
        fresh, shipped = read_all(tmp_path / "sample" / split), read_all(fm.sample_path() / split)
        assert [(p.key, p.caption, p.image_bytes, p.meta) for p in fresh] == \
            [(p.key, p.caption, p.image_bytes, p.meta) for p in shipped], \
            "bundled sample is stale: python -m sanitize.io.fashion_mnist --write-sample"


@pytest.mark.skipif(not HAVE_DEBIAN, reason="needs Debian's dataset-fashion-mnist")
def test_debian_files_counts_and_cli_subset(tmp_path: Path) -> None:
    """Fast stand-in for the full build: the idx headers hold 60,000 + 10,000 images,
    and the CLI builds a real subset with varied captions and 3% noise."""
    assert fm.read_idx_header(DEBIAN / "train-images-idx3-ubyte.gz") == (60000, 28, 28)
    assert fm.read_idx_header(DEBIAN / "t10k-images-idx3-ubyte.gz") == (10000, 28, 28)
    assert fm.read_idx_header(DEBIAN / "train-labels-idx1-ubyte.gz") == (60000,)
    result = CliRunner().invoke(app, ["data", "fashion-mnist", "--out", str(tmp_path / "d"), "--train-size",
                                      "2000", "--test-size", "200", "--noise", "0.03", "--seed", "5"])
    assert result.exit_code == 0, result.output
    train = sidecars(tmp_path / "d" / "train", ["key", "caption", "label", "caption_label", "noise"])
    assert len(train["key"]) == 2000 and sum(train["noise"]) == 60
    assert len(sidecars(tmp_path / "d" / "test", ["key"])["key"]) == 200
    distinct: dict[int, set] = {}
    for caption, label, noise in zip(train["caption"], train["label"], train["noise"]):
        if not noise:
            distinct.setdefault(label, set()).add(caption)
    assert len(distinct) == 10 and min(len(v) for v in distinct.values()) >= 30


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEBIAN, reason="needs Debian's dataset-fashion-mnist")
def test_full_build_on_debian_files(tmp_path: Path) -> None:
    """The real thing: 60,000 + 10,000 pairs, varied captions, 3% noise (~25-55 s)."""
    stats = fm.build(tmp_path / "full", noise=0.03, seed=0)
    train_dir, test_dir = tmp_path / "full" / "train", tmp_path / "full" / "test"
    train = sidecars(train_dir, ["key", "caption", "label", "caption_label", "noise"])
    test = sidecars(test_dir, ["key"])
    assert len(train["key"]) == 60000 and len(set(train["key"])) == 60000
    assert len(test["key"]) == 10000 and not set(test["key"]) & set(train["key"])
    assert list(json.loads((train_dir / "sizes.json").read_text()).values()) == [10000] * 6
    assert sum(train["noise"]) == 1800
    assert all(c != lab for c, lab, n in zip(train["caption_label"], train["label"], train["noise"]) if n)
    distinct: dict[int, set] = {}
    for caption, label, noise in zip(train["caption"], train["label"], train["noise"]):
        if not noise:
            distinct.setdefault(label, set()).add(caption)
    assert len(distinct) == 10 and min(len(v) for v in distinct.values()) >= 30
    assert stats["splits"]["train"]["distinct_captions_per_class"] == {
        fm.FASHION_MNIST_CLASSES[k]: len(v) for k, v in sorted(distinct.items())}
    # The tars hold what the sidecars say: spot-check one shard through our reader.
    last = open_pairs(str(train_dir / "00005.tar"))
    pairs = list(last)
    assert len(pairs) == 10000 and pairs[-1].key == "000059999"
