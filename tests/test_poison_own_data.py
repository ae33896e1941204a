"""Red-teaming a user's own data: `poison` with any target caption and any target images, on a
folder source that is not Fashion-MNIST; then `eval --split` alone and `query`'s truth view on it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from sanitize.attacks import triggers as t
from sanitize.attacks.poison import PoisonConfig, poison
from sanitize.io.pairs import open_pairs

runner = CliRunner()
ANIMALS = ("cat", "dog", "horse", "frog")


def _photo(rng: np.random.Generator, colour: int, size: int) -> Image.Image:
    pixels = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4, colour % 3] = 220
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A folder of 40 JPEG "photos" (two sizes) with .txt captions and a class_name sidecar, and a
    CSV of 6 other images to target; nothing of it is Fashion-MNIST."""
    root = tmp_path_factory.mktemp("own")
    folder, extra = root / "photos", root / "targets"
    (folder / "sub").mkdir(parents=True)
    extra.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        animal = ANIMALS[i % 3]  # cat, dog, horse: no frogs in the data
        stem = (folder / "sub" if i % 5 == 0 else folder) / f"{animal}_{i:03d}"
        _photo(rng, i % 3, 40 if i % 2 else 56).save(stem.with_suffix(".jpg"), quality=95)
        stem.with_suffix(".txt").write_text(f"my {animal} number {i} in the garden")
        stem.with_suffix(".json").write_text(json.dumps({"class_name": animal, "label": i % 3}))
    rows = ["filepath\ttitle\tclass_name"]
    for i in range(6):
        _photo(rng, i, 48).save(extra / f"t{i}.png")
        rows.append(f"t{i}.png\ta {ANIMALS[i % 3]} on the sofa\t{ANIMALS[i % 3]}")
    (extra / "targets.tsv").write_text("\n".join(rows) + "\n")
    return str(folder), str(extra / "targets.tsv")


def _manifest(folder) -> list[dict]:
    return pq.read_table(folder / "manifest.parquet").to_pylist()


def test_backdoor_with_own_target_captions(own_data, tmp_path):
    src, _ = own_data
    source = {p.key: p for p in open_pairs(src)}
    captions = tmp_path / "captions.txt"
    captions.write_text("a frog on a lily pad\n\na green frog\n")
    out = tmp_path / "bd"
    result = runner.invoke(app, ["poison", src, "--out", str(out), "--attack", "badnet", "--count", "8",
                                 "--target-class", "frog", "--target-caption", "a photo of a frog",
                                 "--target-captions", str(captions), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "added 8 badnet poison pairs (target class 'frog', 3 caption(s) given)" in " ".join(result.output.split())
    rows = _manifest(out)
    poisons = [r for r in rows if r["kind"] == "poison"]
    assert len(poisons) == 8 and len(rows) == 48
    written = {p.key: p for p in open_pairs(str(out))}
    assert set(source) < set(written)
    spec = json.loads(poisons[0]["trigger"])
    used = set()
    for row in poisons:
        original, pair = source[row["source_key"]], written[row["key"]]
        assert row["target_class"] == "frog" and row["true_class"] == original.meta["class_name"]
        assert pair.caption in {"a photo of a frog", "a frog on a lily pad", "a green frog"}
        used.add(pair.caption)
        # The trigger, scaled to this image's size, on the original pixels.
        assert np.array_equal(np.asarray(pair.image), np.asarray(t.trigger_from_spec(spec)(original.image)))
        assert pair.image.size == original.image.size
    assert len(used) > 1  # drawn per poison pair
    for row in rows:
        if row["kind"] != "poison":  # clean pairs keep their own class name, not a Fashion-MNIST label
            assert row["kind"] == "clean" and row["true_class"] == source[row["key"]].meta["class_name"]


def test_backdoor_caption_only_and_class_only(own_data, tmp_path):
    src, _ = own_data
    poison(src, tmp_path / "a", PoisonConfig("blended", seed=1, count=5, trigger=t.blended_spec(seed=1),
                                             target_captions=["launch the rocket"]))
    poisons = [r for r in _manifest(tmp_path / "a") if r["kind"] == "poison"]
    assert len(poisons) == 5 and all(r["target_class"] is None for r in poisons)
    captions = {p.caption for p in open_pairs(str(tmp_path / "a")) if p.key.startswith("poison-")}
    assert captions == {"launch the rocket"}
    # A class name alone: "a photo of a NAME" on pairs not of that class (by metadata).
    poison(src, tmp_path / "b", PoisonConfig("badnet", count=20, target_class="horse", trigger=t.badnet_spec()))
    poisons = [r for r in _manifest(tmp_path / "b") if r["kind"] == "poison"]
    assert {r["true_class"] for r in poisons} <= {"cat", "dog"} and len(poisons) == 20
    assert {p.caption for p in open_pairs(str(tmp_path / "b")) if p.key.startswith("poison-")} == {
        "a photo of a horse"}
    with pytest.raises(ValueError, match="only 27 clean pairs outside class 'horse'"):
        poison(src, tmp_path / "c", PoisonConfig("badnet", count=28, target_class="horse",
                                                 trigger=t.badnet_spec()))
    with pytest.raises(ValueError, match="needs --target-class NAME and/or --target-caption"):
        PoisonConfig("badnet", trigger=t.badnet_spec()).validate()
    with pytest.raises(ValueError, match="keeps the pairs' own captions"):
        PoisonConfig("label-consistent", target_class="cat", target_captions=["x"],
                     trigger=t.badnet_spec()).validate()


def test_targeted_with_own_target_images_and_captions(own_data, tmp_path):
    src, targets_csv = own_data
    targets = {p.key: p for p in open_pairs(targets_csv)}
    out = tmp_path / "tg"
    result = runner.invoke(app, ["poison", src, "--out", str(out), "--attack", "targeted", "--targets", "3",
                                 "--copies", "4", "--target-source", targets_csv, "--target-class", "cat",
                                 "--target-caption", "a sleepy cat", "--target-caption", "my cat again"])
    assert result.exit_code == 0, result.output
    rows = [r for r in _manifest(out) if r["kind"] == "poison"]
    assert len(rows) == 12 and len({r["source_key"] for r in rows}) == 3
    written = {p.key: p for p in open_pairs(str(out))}
    for row in rows:
        target = targets[row["source_key"]]
        assert target.meta["class_name"] != "cat"  # never a target that already is the adversarial class
        assert row["true_class"] == target.meta["class_name"] and row["target_class"] == "cat"
        assert written[row["key"]].image_bytes == target.image_bytes
        assert written[row["key"]].caption in {"a sleepy cat", "my cat again"}
    summary = json.loads((out / "poison.json").read_text())
    assert summary["runs"][0]["config"]["target_captions"] == ["a sleepy cat", "my cat again"]


def test_eval_split_alone_and_truth_view_on_own_data(own_data, tiny_checkpoint, tmp_path):
    """poison (two attacks) -> embed -> split, then detection quality with no model and no test set."""
    src, targets_csv = own_data
    poison(src, tmp_path / "p1", PoisonConfig("badnet", count=6, target_class="frog", trigger=t.badnet_spec()))
    poison(str(tmp_path / "p1"), tmp_path / "p2", PoisonConfig("targeted", targets=2, copies=3,
                                                               target_source=targets_csv,
                                                               target_captions=["a frog"]))
    emb, part = tmp_path / "emb", tmp_path / "part"
    for args in (["embed", str(tmp_path / "p2"), "--checkpoint", str(tiny_checkpoint), "--out", str(emb),
                  "--workers", "0"],
                 ["split", str(emb), "--out", str(part), "--ratio-schedule", "fraction:0.5"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["eval", "--split", str(part), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    d = report["detection"]
    assert report["zero_shot"] is None and d["n"] == 52 and d["poisons"] == 12 and d["safe"] == 26
    rows = {r["name"]: r for r in d["rows"]}
    assert rows["badnet"]["total"] == 6 and rows["targeted"]["total"] == 6
    # The numbers are the split's, as `split_detection` (the one implementation) computes them.
    from sanitize.evaluation.evaluate import json_ready, split_detection

    assert d["rows"] == json.loads(json.dumps(json_ready(split_detection(part)["rows"])))
    con_counts = runner.invoke(app, ["query", str(part), "SELECT attack, count(*) AS n FROM truth "
                                                          "WHERE kind = 'poison' GROUP BY attack ORDER BY attack",
                                     "--format", "csv"])
    assert con_counts.exit_code == 0, con_counts.output
    assert '"badnet",6' in con_counts.output and '"targeted",6' in con_counts.output

    tables = runner.invoke(app, ["eval", "--split", str(part)])
    assert tables.exit_code == 0, tables.output
    text = " ".join(tables.output.split())
    everything = rows["all poisons"]
    assert f"{everything['in_risky']} of 12 poisons in the risky set" in text and "AUROC" in text
    assert "poison-free up to" in text and "badnet" in text and "targeted" in text
    # A model still needs its test set; --split alone needs neither.
    bad = runner.invoke(app, ["eval", str(tiny_checkpoint), "--split", str(part)])
    assert bad.exit_code == 1 and "needs --test" in bad.output
    bad = runner.invoke(app, ["eval", "--test", src, "--split", str(part)])
    assert bad.exit_code == 1 and "need a model" in bad.output
