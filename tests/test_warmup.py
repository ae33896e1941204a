"""`safeclip warmup` end to end on a few hundred bundled Fashion-MNIST pairs: the
unimodal losses fall, the checkpoint reloads, and an interrupted run resumed with
--resume ends in exactly the state of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from conftest import write_sample_subset
from sanitize.models.checkpoint import load_checkpoint
from sanitize.io.pairs import open_pairs

runner = CliRunner()
# 192 pairs in 2 shards of 96, batch 32: 6 steps per epoch, 4 unimodal + 1 CLIP epoch (fewer
# steps leave the image loss within its noise: it did not fall in 1 of 4 seeds at 9 steps).
ARGS = ["--unimodal-epochs", "4", "--clip-epochs", "1", "--batch-size", "32", "--lr", "2e-3",
        "--memory-bank", "128", "--seed", "0", "--threads", "1"]
STEPS = 30


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """The first 192 pairs of the bundled sample."""
    out = tmp_path_factory.mktemp("fmnist192")
    write_sample_subset(out, 192, samples_per_shard=96)
    return out


@pytest.fixture(scope="module")
def full_run(pairs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "warm.pt"
    result = runner.invoke(app, ["warmup", str(pairs_dir), "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    return out, result.output


def metrics(path):
    return [json.loads(line) for line in path.with_name(path.stem + "_metrics.jsonl").read_text().splitlines()]


def test_unimodal_losses_fall_and_checkpoint_reloads(full_run):
    out, output = full_run
    assert "warm-up done: 5 epochs, 30 steps" in output
    records = metrics(out)
    assert [r["phase"] for r in records] == ["unimodal"] * 4 + ["clip"]
    assert all(r["pairs"] == 192 and r["steps"] == 6 for r in records)
    first, last = records[0], records[3]
    assert last["loss_image"] < first["loss_image"]
    assert last["loss_text"] < first["loss_text"]
    assert records[4]["loss_clip"] > 0 and records[4]["pairs_per_s"] > 0

    model, tokenizer, image_size, config, state = load_checkpoint(out)
    assert config["name"] == "safeclip-tiny-vit" and image_size == 28
    assert state["stage"] == "warmup" and state["warmup_state"]["finished"]
    assert state["warmup_state"]["global_step"] == STEPS
    stats = json.loads(out.with_name("warm_stats.json").read_text())
    assert stats["finished"] and stats["pairs_per_epoch"] == 192 and len(stats["epochs"]) == 5


def test_interrupted_runs_resume_to_the_uninterrupted_state(full_run, pairs_dir, tmp_path):
    reference, _ = full_run
    out = tmp_path / "warm.pt"
    # Stop mid-epoch in the unimodal phase (step 8 of 30), then mid-epoch in the CLIP phase (27).
    first = runner.invoke(app, ["warmup", str(pairs_dir), "--out", str(out), *ARGS, "--max-steps", "8"])
    assert first.exit_code == 0 and "stopped after 8 steps" in first.output, first.output
    assert len(metrics(out)) == 1  # only epoch 1 finished
    second = runner.invoke(app, ["warmup", str(pairs_dir), "--out", str(out), "--resume", "--max-steps", "27",
                                 "--threads", "1"])
    assert second.exit_code == 0 and "stopped after 27 steps" in second.output, second.output
    third = runner.invoke(app, ["warmup", str(pairs_dir), "--out", str(out), "--resume", "--threads", "1"])
    assert third.exit_code == 0 and "warm-up done" in third.output, third.output

    expected, got = torch.load(reference, weights_only=True), torch.load(out, weights_only=True)
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, got["state_dict"][name]), name
    for modality in ("image", "text"):
        assert torch.equal(expected["training_state"]["banks"][modality]["bank"],
                           got["training_state"]["banks"][modality]["bank"])
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "pairs_per_s")}  # noqa: E731
    assert [drop(r) for r in metrics(out)] == [drop(r) for r in metrics(reference)]

    again = runner.invoke(app, ["warmup", str(pairs_dir), "--out", str(out), "--resume", "--threads", "1"])
    assert again.exit_code == 0 and "warm-up done" in again.output  # nothing left to do


def test_bad_input_is_a_one_line_error(pairs_dir, full_run, tmp_path, class_pairs_dir):
    existing, _ = full_run
    copy = tmp_path / "copy.pt"
    copy.write_bytes(existing.read_bytes())
    cases = [
        ["warmup", str(pairs_dir), "--out", str(existing)],  # would overwrite
        ["warmup", str(tmp_path / "nope"), "--out", str(tmp_path / "a.pt")],
        ["warmup", str(pairs_dir), "--out", str(tmp_path / "b.pt"), "--model", "no-such-model"],
        ["warmup", str(pairs_dir), "--out", str(tmp_path / "c.pt"), "--resume"],
        ["warmup", str(pairs_dir), "--out", str(tmp_path / "d.pt"), "--batch-size", "1"],
        ["warmup", str(class_pairs_dir), "--out", str(copy), "--resume"],  # other data than it was trained on
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code != 0, args
        assert "Traceback" not in result.output and "error:" in result.output, result.output


def test_training_batches_cover_every_pair_once_per_epoch_across_workers_and_ranks(class_pairs_dir):
    from sanitize.models.factory import create_model
    from sanitize.train.batches import PairBatches, make_loader

    _model, tokenizer, image_size, _config = create_model("safeclip-tiny-vit")
    source = open_pairs(str(class_pairs_dir))  # 120 pairs in 3 shards of 40
    all_keys = sorted(p.key for p in open_pairs(str(class_pairs_dir)))
    # Coverage and order with cheap plain batches; augmented views checked on one batch.
    data = PairBatches(source, tokenizer, image_size, batch_size=16, seed=3, views=False, plain=True)

    def epoch_keys(dataset, epoch, workers):
        dataset.set_epoch(epoch)
        batches = [b for b in make_loader(dataset, workers) if b["key"]]
        assert len(batches) == dataset.batches_per_epoch(epoch, workers)
        return [k for b in batches for k in b["key"]]

    keys0 = epoch_keys(data, 0, 0)
    assert sorted(keys0) == all_keys
    assert epoch_keys(data, 0, 0) == keys0  # seeded
    assert epoch_keys(data, 1, 0) != keys0  # reshuffled every epoch
    assert epoch_keys(data, 0, 1) == keys0  # one worker reads exactly what the main process does
    assert sorted(epoch_keys(data, 0, 2)) == all_keys

    views = PairBatches(source, tokenizer, image_size, batch_size=16, seed=3, views=True, plain=True, views_here=True)
    first, again = next(iter(views)), next(iter(views))
    assert first["key"] == keys0[:16]
    assert first["image1"].shape == (16, 3, 28, 28) and first["text2"].shape == (16, 32)
    assert first["image"].shape == (16, 3, 28, 28) and not torch.equal(first["image1"], first["image2"])
    assert torch.equal(first["image1"], again["image1"]) and torch.equal(first["text2"], again["text2"])
    # Left to the trainer's device: the decoded squares and each image's drawn parameters, from
    # which the device makes exactly the views the workers would have made.
    from sanitize.train.views import BatchViews

    raw = next(iter(PairBatches(source, tokenizer, image_size, batch_size=16, seed=3, views=True, plain=False)))
    assert raw["image_u8"].dtype == torch.uint8 and raw["image_u8"].shape == (16, 3, 28, 28)
    assert raw["view_params"].shape[:2] == (16, 2) and "image1" not in raw
    made = BatchViews(image_size)(raw["image_u8"], raw["view_params"])
    assert torch.equal(made[0], first["image1"]) and torch.equal(made[1], first["image2"])

    ranks = [PairBatches(source, tokenizer, image_size, 16, seed=3, views=False, plain=True, rank=r,
                         world_size=2) for r in (0, 1)]
    rank_keys = [set(epoch_keys(d, 0, 0)) for d in ranks]
    assert rank_keys[0].isdisjoint(rank_keys[1]) and sorted(rank_keys[0] | rank_keys[1]) == all_keys


def test_default_threads_take_omp_num_threads_when_set(monkeypatch):
    from sanitize.train.distributed import default_threads, default_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads(workers=1) == 15  # one per core not used by the worker
    assert default_workers() == 8 and default_threads(default_workers()) == 8  # never more than the cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share 16 cores
    assert default_threads(workers=1) == 3 and default_workers() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # several jobs sharing the machine
    assert default_threads(workers=1) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a thread count: ignored
    assert default_threads(workers=0) == 16
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert default_workers() == 0 and default_threads(0) == 1
