"""`safeclip export`: a partition round-trips through our reader, from the original source."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from cli.main import app
from sanitize.io.pairs import open_pairs

runner = CliRunner()


def _embed_and_split(source_dir, checkpoint, tmp_path):
    emb, part = tmp_path / "emb", tmp_path / "part"
    for args in (["embed", str(source_dir), "--checkpoint", str(checkpoint), "--out", str(emb), "--workers", "0"],
                 ["split", str(emb), "--out", str(part), "--ratio-schedule", "fraction:0.4"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return part


def test_exported_partition_round_trips(class_pairs_dir, tiny_checkpoint, tmp_path):
    part = _embed_and_split(class_pairs_dir, tiny_checkpoint, tmp_path)
    out = tmp_path / "safe_shards"
    result = runner.invoke(app, ["export", str(part), "--partition", "safe", "--out", str(out),
                                 "--samples-per-shard", "20"])
    assert result.exit_code == 0, result.output
    safe_keys = set(pq.read_table(part / "safe").column("key").to_pylist())
    assert len(safe_keys) == 48  # 40% of 120
    assert "exported 48 safe pairs of 48" in result.output

    exported = {p.key: p for p in open_pairs(str(out))}
    assert set(exported) == safe_keys
    originals = {p.key: p for p in open_pairs(str(class_pairs_dir)) if p.key in safe_keys}
    for key, pair in exported.items():
        original = originals[key]
        assert pair.caption == original.caption
        assert pair.meta["label"] == original.meta["label"]
        assert np.array_equal(np.asarray(pair.image), np.asarray(original.image))
    # open_clip reads the dataset size from sizes.json: 48 pairs in shards of 20.
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 20, "00001.tar": 20, "00002.tar": 8}


def test_risky_partition_and_missing_keys_are_reported(class_pairs_dir, tiny_checkpoint, tmp_path):
    part = _embed_and_split(class_pairs_dir, tiny_checkpoint, tmp_path)
    # Export from a source lacking some keys: the run says so and exits non-zero.
    partial = tmp_path / "partial"
    from sanitize.io.shards import write_pairs

    write_pairs([p for p in open_pairs(str(class_pairs_dir)) if int(p.key) < 60], partial)
    result = runner.invoke(app, ["export", str(part), "--partition", "risky", "--out", str(tmp_path / "r"),
                                 "--source", str(partial)])
    risky_keys = set(pq.read_table(part / "risky").column("key").to_pylist())
    missing = {k for k in risky_keys if int(k) >= 60}
    assert missing and result.exit_code == 1
    assert f"{len(missing)} key(s) of the partition were not found in the source" in result.output
    stats = json.loads((tmp_path / "r" / "export_stats.json").read_text())
    assert stats["written"] == len(risky_keys) - len(missing)


def test_export_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no split.json" in result.output and "Traceback" not in result.output
    bad = runner.invoke(app, ["export", str(tmp_path), "--partition", "maybe", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 1 and "unknown partition 'maybe'" in bad.output


def test_export_names_open_clip_command_and_a_webdataset_it_cannot_use(monkeypatch):
    from importlib import metadata

    from sanitize.stages import export

    assert export.open_clip_command("out", 3).startswith(
        "python -m open_clip_train.main --train-data 'out/{00000..00002}.tar' --dataset-type webdataset")
    assert "'out/00000.tar'" in export.open_clip_command("out", 1)
    versions = {"webdataset": "0.2.86"}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, "version", version)
    assert export.open_clip_trainer_problem() is None
    versions["webdataset"] = "0.2.111"
    assert "webdataset 0.2.111 breaks open_clip's trainer" in export.open_clip_trainer_problem()
    del versions["webdataset"]
    assert "safeclip[train]" in export.open_clip_trainer_problem()
