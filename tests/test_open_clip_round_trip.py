"""safeclip -> open_clip's trainer -> safeclip: `safeclip export` output trains with
`python -m open_clip_train.main` (the `train` extra), and the `epoch_N.pt` it writes scores pairs
in `embed`, starts `warmup` and is evaluated by `eval` with --model/--pretrained."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from conftest import CLASS_WORDS
from sanitize.models.factory import CONFIG_DIR

pytest.importorskip("webdataset", reason="open_clip's trainer needs the train extra: pip install -e '.[dev,train]'")
pytest.importorskip("open_clip_train.main", reason="open_clip's trainer needs the train extra")

runner = CliRunner()
MODEL = "safeclip-tiny-vit"


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def trained(class_pairs_dir, tiny_checkpoint, tmp_path_factory):
    """The safe partition of a split, exported, then one epoch of open_clip's trainer on it."""
    root = tmp_path_factory.mktemp("open_clip")
    invoke("embed", class_pairs_dir, "--checkpoint", tiny_checkpoint, "--out", root / "emb", "--workers", "0")
    invoke("split", root / "emb", "--out", root / "part", "--ratio-schedule", "fraction:0.5")
    exported = invoke("export", root / "part", "--partition", "safe", "--out", root / "safe",
                      "--samples-per-shard", "32")
    assert "open_clip_train.main --train-data" in exported.output and "safe/{00000..00001}.tar" in exported.output
    assert "warning" not in exported.output  # the train extra's webdataset: no version warning
    logs = root / "logs"
    # open_clip's trainer itself, with the shipped config registered (given as a .json path here)
    command = [sys.executable, "-m", "sanitize.models.open_clip_main",
               "--train-data", str(root / "safe" / "{00000..00001}.tar"), "--dataset-type", "webdataset",
               "--model", str(CONFIG_DIR / f"{MODEL}.json"), "--batch-size", "16", "--epochs", "1",
               "--lr", "1e-3", "--warmup", "1",
               "--workers", "1", "--device", "cpu", "--precision", "fp32", "--seed", "0",
               "--logs", str(logs), "--name", "rt", "--report-to", "", "--save-frequency", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # It read the export's sizes.json (60 pairs) and trained every step of the epoch.
    assert "Train Epoch: 0 [64/64 (100%)]" in done.stdout + done.stderr
    epoch = logs / "rt" / "checkpoints" / "epoch_1.pt"
    assert epoch.is_file()
    return root, epoch


def test_open_clip_checkpoint_scores_like_the_same_weights_in_safeclip_format(trained, class_pairs_dir, tmp_path):
    from sanitize.models.checkpoint import load_model, save_checkpoint
    from sanitize.models.factory import create_model

    root, epoch = trained
    payload = torch.load(epoch, map_location="cpu", weights_only=True)
    assert set(payload) >= {"epoch", "state_dict", "optimizer"} and payload["epoch"] == 1
    assert float(payload["state_dict"]["logit_scale"]) != pytest.approx(math.log(1 / 0.07))  # it trained

    result = invoke("embed", class_pairs_dir, "--model", MODEL, "--pretrained", epoch, "--out", tmp_path / "a",
                    "--workers", "0")
    assert "120 pairs" in result.output
    manifest = json.loads((tmp_path / "a" / "embed.json").read_text())
    assert manifest["weights"] == "open_clip" and manifest["model"] == MODEL
    assert manifest["checkpoint"] == str(epoch.resolve())

    # The same weights as a safeclip checkpoint give byte-identical embeddings.
    model, _tok, _size, config = create_model(MODEL)
    model.load_state_dict(payload["state_dict"])
    save_checkpoint(tmp_path / "same.pt", model, config)
    invoke("embed", class_pairs_dir, "--checkpoint", tmp_path / "same.pt", "--out", tmp_path / "b", "--workers", "0")
    for name in ("00000.parquet", "00001.parquet", "00002.parquet"):
        a, b = pq.read_table(tmp_path / "a" / name), pq.read_table(tmp_path / "b" / name)
        assert a.column("similarity").equals(b.column("similarity")) and a.column("image_emb").equals(
            b.column("image_emb"))

    # Without --model, the run folder's params.txt names the architecture; DDP's `module.`
    # prefixes load too.
    assert load_model(pretrained=epoch).config["name"] == MODEL
    prefixed = dict(payload, state_dict={f"module.{k}": v for k, v in payload["state_dict"].items()})
    torch.save(prefixed, tmp_path / "ddp.pt")
    loaded = load_model(model=MODEL, pretrained=tmp_path / "ddp.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key

    # Mistakes are one line.
    wrong = runner.invoke(app, ["embed", str(class_pairs_dir), "--checkpoint", str(epoch), "--out",
                                str(tmp_path / "c")])
    assert wrong.exit_code == 1 and "--model ARCH --pretrained" in wrong.output
    wrong = runner.invoke(app, ["embed", str(class_pairs_dir), "--pretrained", str(tmp_path / "ddp.pt"), "--out",
                                str(tmp_path / "c")])
    assert wrong.exit_code == 1 and "pass --model" in wrong.output
    wrong = runner.invoke(app, ["embed", str(class_pairs_dir), "--model", "safeclip-small-vit", "--pretrained",
                                str(epoch), "--out", str(tmp_path / "c")])
    assert wrong.exit_code == 1 and "cannot load into safeclip-small-vit" in wrong.output
    assert "Traceback" not in wrong.output


def test_open_clip_checkpoint_starts_warmup_and_is_evaluated(trained, class_pairs_dir, tmp_path):
    from sanitize.models.checkpoint import load_checkpoint
    from sanitize.models.factory import create_model

    _root, epoch = trained
    start = torch.load(epoch, map_location="cpu", weights_only=True)["state_dict"]
    invoke("warmup", class_pairs_dir, "--out", tmp_path / "w.pt", "--model", MODEL, "--pretrained", epoch,
           "--unimodal-epochs", "0", "--clip-epochs", "1", "--batch-size", "32", "--max-steps", "1",
           "--workers", "0", "--threads", "1")
    warmed = load_checkpoint(tmp_path / "w.pt")[0].state_dict()
    torch.manual_seed(1)
    fresh = create_model(MODEL)[0].state_dict()
    key = "token_embedding.weight"
    # One step away from the open_clip weights, nowhere near a fresh initialisation.
    assert (warmed[key] - start[key]).norm() < 0.05 * (fresh[key] - start[key]).norm()

    out = tmp_path / "eval.json"
    result = invoke("eval", "--model", MODEL, "--pretrained", epoch, "--test", class_pairs_dir,
                    "--classes", ",".join(CLASS_WORDS), "--out", out)
    assert "zero-shot top-1" in result.output
    report = json.loads(out.read_text())
    assert report["model"]["weights"] == "open_clip" and report["checkpoint"] == str(epoch.resolve())
    assert report["test"]["pairs"] == 120 and 0.0 <= report["zero_shot"]["top1"] <= 1.0
    assert np.isclose(sum(r["n"] for r in report["zero_shot"]["per_class"]), 120)
