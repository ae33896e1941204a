"""Poison injection: counts, trigger pixels, captions, manifest vs files, seeds, reruns."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from sanitize.attacks import triggers as t
from sanitize.io.fashion_mnist import sample_path
from sanitize.io.pairs import open_pairs
from sanitize.attacks.poison import PoisonConfig, mentions, poison
from sanitize.io.shards import write_pairs


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    """400 train + 100 test pairs of the bundled sample (real images, 3% noise)."""
    root = tmp_path_factory.mktemp("src")
    for split, n in (("train", 400), ("test", 100)):
        write_pairs(itertools.islice(iter(open_pairs(str(sample_path() / split))), n), root / split,
                    samples_per_shard=150)
    return str(root / "train"), str(root / "test")


def read(folder: Path | str) -> dict:
    source = open_pairs(str(folder))
    pairs = {p.key: p for p in source}
    assert source.skips.total == 0
    return pairs


def manifest(folder: Path) -> list[dict]:
    return pq.read_table(folder / "manifest.parquet").to_pylist()


def check_manifest_matches_files(out: Path, src_pairs: dict) -> list[dict]:
    rows = manifest(out)
    pairs = read(out)
    assert [r["key"] for r in rows] == list(pairs)  # same keys, same (written) order
    for row in rows:
        if row["kind"] != "poison":
            pair, original = pairs[row["key"]], src_pairs[row["key"]]
            assert pair.image_bytes == original.image_bytes and pair.caption == original.caption
            assert row["kind"] == ("noise" if original.meta["noise"] else "clean")
            assert row["true_class"] == original.meta["class_name"]
    assert set(src_pairs) <= set(pairs)  # every clean pair kept, with its key
    summary = json.loads((out / "poison.json").read_text())
    assert summary["counts"]["total"] == len(rows)
    assert summary["counts"]["poison"] == sum(r["kind"] == "poison" for r in rows)
    return rows


@pytest.mark.parametrize("attack, spec", [("badnet", t.badnet_spec()), ("blended", t.blended_spec(seed=1)),
                                          ("wanet", t.wanet_spec(strength=1.0, seed=1))])
def test_backdoor_adds_triggered_copies_with_target_captions(sources, tmp_path: Path, attack, spec) -> None:
    train, _ = sources
    src = read(train)
    out = tmp_path / "out"
    summary = poison(train, out, PoisonConfig(attack, seed=0, target_class="trouser", count=12, trigger=spec))
    rows = check_manifest_matches_files(out, src)
    poisons = [r for r in rows if r["kind"] == "poison"]
    assert len(poisons) == 12 and len(rows) == len(src) + 12 and summary["runs"][0]["poison_pairs"] == 12
    pairs = read(out)
    trigger = t.trigger_from_spec(json.loads(poisons[0]["trigger"]))
    for row in poisons:
        assert row["key"].startswith(f"poison-{attack}-") and row["attack"] == attack
        source = src[row["source_key"]]
        assert row["true_class"] == source.meta["class_name"] != "trouser" and row["target_class"] == "trouser"
        pair = pairs[row["key"]]
        after, before = np.asarray(pair.image), np.asarray(source.image)
        assert np.array_equal(after, np.asarray(trigger(source.image)))  # exactly the recorded trigger
        if attack == "badnet":
            top, left, bottom, right = t.patch_box(spec, 28, 28)
            assert np.array_equal(after[top:bottom, left:right], t.patch_pattern("checkerboard", 3))
            after = after.copy()
            after[top:bottom, left:right] = before[top:bottom, left:right]
            assert np.array_equal(after, before)  # nothing outside the patch
        assert mentions(pair.caption, "trouser") and "noise" not in pair.meta
    # Clean images carry no trigger: none of them equals its triggered version.
    clean_images = [np.asarray(p.image) for k, p in pairs.items() if not k.startswith("poison-")]
    assert not any(np.array_equal(a, np.asarray(trigger(a))) for a in clean_images[:50])


def test_share_sets_the_count(sources, tmp_path: Path) -> None:
    train, _ = sources
    poison(train, tmp_path / "o", PoisonConfig("badnet", target_class="bag", share=0.05, trigger=t.badnet_spec()))
    assert sum(r["kind"] == "poison" for r in manifest(tmp_path / "o")) == 20  # 5% of 400


def test_label_consistent_keeps_captions_and_picks_target_images(sources, tmp_path: Path) -> None:
    train, _ = sources
    src = read(train)
    poison(train, tmp_path / "o", PoisonConfig("label-consistent", target_class="sneaker", count=10,
                                               trigger=t.badnet_spec(pattern="white")))
    pairs = read(tmp_path / "o")
    rows = [r for r in check_manifest_matches_files(tmp_path / "o", src) if r["kind"] == "poison"]
    assert len(rows) == 10
    for row in rows:
        source = src[row["source_key"]]
        assert source.meta["class_name"] == "sneaker" and not source.meta["noise"]
        assert pairs[row["key"]].caption == source.caption
        assert np.all(np.asarray(pairs[row["key"]].image)[24:27, 24:27] == 255)


def test_targeted_copies_targets_with_adversarial_captions(sources, tmp_path: Path) -> None:
    train, test = sources
    src, targets = read(train), read(test)
    summary = poison(train, tmp_path / "o", PoisonConfig("targeted", seed=2, targets=4, copies=6,
                                                         target_source=test))
    rows = [r for r in check_manifest_matches_files(tmp_path / "o", src) if r["kind"] == "poison"]
    pairs = read(tmp_path / "o")
    assert len(rows) == 24 and len({r["source_key"] for r in rows}) == 4
    listed = summary["runs"][0]["targets"]
    assert len(listed) == 4 and all(x["copies"] == 6 for x in listed)
    adversarial = {x["source_key"]: x["adversarial_class"] for x in listed}
    for row in rows:
        target = targets[row["source_key"]]
        assert row["target_class"] == adversarial[row["source_key"]] != target.meta["class_name"]
        assert row["true_class"] == target.meta["class_name"] and row["trigger"] is None
        assert pairs[row["key"]].image_bytes == target.image_bytes  # the target image itself
        assert mentions(pairs[row["key"]].caption, row["target_class"])
    # Copies of one target carry varied captions, not one repeated string.
    first = rows[0]["source_key"]
    assert len({pairs[r["key"]].caption for r in rows if r["source_key"] == first}) > 1


def test_same_seed_identical_output_other_seed_differs(sources, tmp_path: Path) -> None:
    train, _ = sources
    config = dict(attack="badnet", target_class="coat", count=8, trigger=t.badnet_spec())
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        poison(train, tmp_path / name, PoisonConfig(seed=seed, **config), samples_per_shard=100)
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert "00004.tar" in files  # 408 pairs over 100-pair shards
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() != (tmp_path / "c" / "manifest.parquet").read_bytes()
    # Poisons are scattered among the clean pairs, not appended in one block.
    keys = [r["key"] for r in manifest(tmp_path / "a")]
    positions = [i for i, k in enumerate(keys) if k.startswith("poison-")]
    assert positions[0] < len(keys) - 8


def test_rerun_on_poisoned_output_extends_the_manifest(sources, tmp_path: Path) -> None:
    train, test = sources
    src = read(train)
    poison(train, tmp_path / "one", PoisonConfig("badnet", target_class="bag", count=10, trigger=t.badnet_spec()))
    summary = poison(str(tmp_path / "one"), tmp_path / "two",
                     PoisonConfig("blended", seed=1, target_class="dress", count=10, trigger=t.blended_spec()))
    first, second = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert [r["run"] for r in summary["runs"]] == [0, 1] and summary["counts"]["poison"] == 20
    by_key = {r["key"]: r for r in second}
    assert all(by_key[r["key"]] == r for r in first)  # earlier rows kept as they were
    new = [r for r in second if r["run"] == 1]
    assert len(new) == 10 and all(r["attack"] == "blended" for r in new)
    assert not any(r["source_key"].startswith("poison-") for r in new)  # never re-poisons a poison
    three = poison(str(tmp_path / "two"), tmp_path / "three",
                   PoisonConfig("badnet", seed=3, target_class="bag", count=5, trigger=t.badnet_spec()))
    keys = [r["key"] for r in manifest(tmp_path / "three") if r["attack"] == "badnet"]
    assert len(set(keys)) == 15 and three["counts"]["total"] == len(src) + 25


def test_cli_poison_and_bad_input(sources, tmp_path: Path) -> None:
    train, test = sources
    runner = CliRunner()
    result = runner.invoke(app, ["poison", train, "--out", str(tmp_path / "o"), "--attack", "badnet",
                                 "--target-class", "trouser", "--count", "7", "--position", "top-left",
                                 "--pattern", "white", "--patch-size", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "added 7 badnet poison pairs" in result.output
    rows = [r for r in manifest(tmp_path / "o") if r["kind"] == "poison"]
    assert len(rows) == 7
    spec = json.loads(rows[0]["trigger"])
    assert spec["position"] == "top-left" and spec["size"] == 4 and spec["pattern"] == "white"
    pair = read(tmp_path / "o")[rows[0]["key"]]
    assert np.all(np.asarray(pair.image)[1:5, 1:5] == 255)

    def fails(args: list[str], message: str) -> None:
        result = runner.invoke(app, ["poison", *args])
        assert result.exit_code != 0, result.output
        assert message in result.output and "Traceback" not in result.output, result.output

    fails([train, "--out", str(tmp_path / "o"), "--attack", "badnet", "--target-class", "bag"], "not empty")
    fails([train, "--out", str(tmp_path / "n1"), "--attack", "sticker"], "unknown attack")
    fails([train, "--out", str(tmp_path / "n2"), "--attack", "badnet"], "needs --target-class")
    fails([train, "--out", str(tmp_path / "n3"), "--attack", "targeted"], "needs --target-source")
    fails([str(tmp_path / "missing"), "--out", str(tmp_path / "n4"), "--attack", "badnet", "--target-class",
           "bag"], "no such file")
    fails([train, "--out", str(tmp_path / "n5"), "--attack", "label-consistent", "--target-class", "bag",
           "--count", "1000"], "only")
    assert not any((tmp_path / n).exists() for n in ("n1", "n2", "n3", "n4", "n5"))
