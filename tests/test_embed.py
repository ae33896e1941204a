"""`safeclip embed`: schema, values, resume, worker and process invariance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from sanitize.train.augment import eval_transform
from sanitize.models.checkpoint import load_checkpoint
from sanitize.io.artifacts import Embeddings
from sanitize.stages.embed import embed_source
from sanitize.models.factory import encode_pairs
from sanitize.io.pairs import open_pairs
from sanitize.io.shards import write_pairs

runner = CliRunner()


def _embed(source_dir, checkpoint, out, **kwargs):
    model, tokenizer, image_size, _config, _state = load_checkpoint(checkpoint)
    source = open_pairs(str(source_dir))
    return embed_source(source, model, tokenizer, eval_transform(image_size), out,
                        **{"batch_size": 16, "num_workers": 0, **kwargs})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_schema_and_similarity_equal_the_models_cosine(class_pairs_dir, tiny_checkpoint, tmp_path):
    result = _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "emb", dtype="float32")
    assert (result.shards_done, result.pairs) == (3, 120)
    files = sorted((tmp_path / "emb").glob("*.parquet"))
    assert [f.name for f in files] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    table = pq.read_table(files[0])
    assert table.column_names[:3] == ["key", "caption", "url"]
    assert {"label", "image_emb", "text_emb", "similarity"} <= set(table.column_names)
    assert table.schema.field("image_emb").type == pa.list_(pa.float32(), 128)
    image_emb = table.column("image_emb").combine_chunks().flatten().to_numpy().reshape(-1, 128)
    text_emb = table.column("text_emb").combine_chunks().flatten().to_numpy().reshape(-1, 128)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1, atol=1e-5)

    # Recompute the first 5 pairs directly with the model: cosines must agree.
    model, tokenizer, image_size, _c, _s = load_checkpoint(tiny_checkpoint)
    pairs = [p for _, p in zip(range(5), open_pairs(str(class_pairs_dir)))]
    assert [p.key for p in pairs] == table.column("key").to_pylist()[:5]
    with torch.no_grad():
        img, txt = encode_pairs(model.eval(), torch.stack([eval_transform(image_size)(p.image) for p in pairs]),
                                tokenizer([p.caption for p in pairs]))
    expected = (img * txt).sum(-1).numpy()
    np.testing.assert_allclose(table.column("similarity").to_numpy()[:5], expected, atol=1e-5)
    assert table.column("caption").to_pylist()[:5] == [p.caption for p in pairs]
    assert table.column("label").to_pylist()[:5] == [p.meta["label"] for p in pairs]


def test_float16_storage_is_smaller_and_keeps_float32_similarity(class_pairs_dir, tiny_checkpoint, tmp_path):
    _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "emb", dtype="float16")
    _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "emb32", dtype="float32")
    size16 = (tmp_path / "emb" / "00000.parquet").stat().st_size
    assert size16 < 0.75 * (tmp_path / "emb32" / "00000.parquet").stat().st_size
    table = pq.read_table(tmp_path / "emb" / "00000.parquet")
    assert table.schema.field("text_emb").type == pa.list_(pa.float16(), 128)
    assert table.schema.field("similarity").type == pa.float32()


def test_killed_run_resumes_to_byte_identical_output(class_pairs_dir, tiny_checkpoint, tmp_path):
    _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "full")
    seen = []

    def die_in_second_shard(n):
        seen.append(n)
        if sum(seen) > 56:  # first shard (40) done, second one half way
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "resumed", on_batch=die_in_second_shard)
    # Only the finished shard exists; nothing partial, no visible temporary file.
    assert sorted(os.listdir(tmp_path / "resumed")) == ["00000.parquet"]
    result = _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "resumed")
    assert (result.shards_skipped, result.shards_done, result.pairs) == (1, 2, 80)
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")


def test_worker_count_does_not_change_output(class_pairs_dir, tiny_checkpoint, tmp_path):
    _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "w0", num_workers=0)
    _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "w2", num_workers=2)
    assert _files(tmp_path / "w0") == _files(tmp_path / "w2")


def test_one_shard_decoded_in_lanes_by_every_worker_gives_the_same_file(class_pairs_dir, tiny_checkpoint, tmp_path):
    """Fewer shards than workers: each worker decodes a lane of the shard; the file is the
    one a single reader writes (rows in reading order), and no pair is counted twice."""
    write_pairs(open_pairs(str(class_pairs_dir)), tmp_path / "one", samples_per_shard=1000)
    whole = _embed(tmp_path / "one", tiny_checkpoint, tmp_path / "w0", num_workers=0)
    lanes = _embed(tmp_path / "one", tiny_checkpoint, tmp_path / "w2", num_workers=2)
    assert (whole.shards_done, whole.pairs) == (lanes.shards_done, lanes.pairs) == (1, 120)
    assert _files(tmp_path / "w0") == _files(tmp_path / "w2")


def test_cli_writes_manifest_and_reports_rate(class_pairs_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "emb"
    result = runner.invoke(app, ["embed", str(class_pairs_dir), "--checkpoint", str(tiny_checkpoint),
                                 "--out", str(out), "--workers", "0", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert "embedded 120 pairs in 3 shard(s)" in result.output and "pairs/s" in result.output
    manifest = Embeddings(out).manifest().to_json()
    assert manifest["count"] == 120 and manifest["dim"] == 128 and manifest["source_format"] == "webdataset"
    assert manifest["shards"] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    again = runner.invoke(app, ["embed", str(class_pairs_dir), "--checkpoint", str(tiny_checkpoint),
                                "--out", str(out), "--workers", "0"])
    assert again.exit_code == 0 and "embedded 0 pairs in 0 shard(s), 3 already done" in again.output


def test_cli_bad_checkpoint_is_one_line_error(class_pairs_dir, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["embed", str(class_pairs_dir), "--checkpoint", str(bad), "--out", str(tmp_path / "e")])
    assert result.exit_code != 0
    assert "error:" in result.output and "Traceback" not in result.output
    missing = runner.invoke(app, ["embed", str(tmp_path / "nope"), "--checkpoint", str(bad), "--out", str(tmp_path / "e")])
    assert missing.exit_code != 0 and "no such file or folder" in missing.output


def test_torchrun_two_processes_equal_one(class_pairs_dir, tiny_checkpoint, tmp_path):
    _embed(class_pairs_dir, tiny_checkpoint, tmp_path / "single", batch_size=256)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cli.main", "embed", str(class_pairs_dir), "--checkpoint", str(tiny_checkpoint),
           "--out", str(tmp_path / "ddp"), "--workers", "0", "--device", "cpu"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "embed.json").read_text())
    assert manifest["world_size"] == 2 and manifest["count"] == 120
    ddp_files = {k: v for k, v in _files(tmp_path / "ddp").items() if k.endswith(".parquet")}
    assert ddp_files == _files(tmp_path / "single")
