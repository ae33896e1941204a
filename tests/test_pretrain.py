"""`safeclip pretrain` on 200 bundled Fashion-MNIST pairs: all three phases write the
expected checkpoints and per-epoch splits, the safe ratio follows the schedule, a
killed run resumed with --resume ends in the uninterrupted run's weights, the
baselines behave (--defense none never splits), --score-from-training scores from
the training pass, and a 2-process torchrun run splits exactly like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from conftest import write_sample_subset

runner = CliRunner()
# 200 pairs in 2 shards of 100, batch 32: 7 steps per epoch; 1 unimodal + 1 CLIP + 2 split epochs.
ARGS = ["--epochs", "4", "--unimodal-epochs", "1", "--clip-epochs", "1", "--batch-size", "32", "--lr", "2e-3",
        "--memory-bank", "64", "--seed", "0", "--threads", "1", "--workers", "0"]
PAPER = ["--defense", "safeclip"]  # the paper's loop; the default defense is resplit


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """The first 200 pairs of the bundled sample."""
    out = tmp_path_factory.mktemp("fmnist200")
    write_sample_subset(out, 200, samples_per_shard=100)
    return out


@pytest.fixture(scope="module")
def full_run(pairs_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), *PAPER, *ARGS,
                                 "--eval-every", "1", "--eval-test", str(pairs_dir)])
    assert result.exit_code == 0, result.output
    return run, result.output


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def safe_keys(part: Path) -> set[str]:
    return {k for f in sorted((part / "safe").glob("*.parquet"))
            for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()}


def test_all_phases_write_checkpoints_splits_and_metrics(full_run):
    run, output = full_run
    assert "pretrain done (safeclip): 4 epochs" in output
    assert (run / "warmup.pt").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]
    records = metrics(run)
    assert [(r["stage"], r["phase"]) for r in records] == [
        ("warmup", "unimodal"), ("warmup", "clip"), ("pretrain", "safeclip"), ("pretrain", "safeclip")]
    for r in records[2:]:
        # every pair is visited once: the safe set by CLIP steps, the risky set by unimodal steps
        assert r["pairs"] == 200 and r["steps"] == r["steps_clip"] + r["steps_unimodal"]
        assert r["n_safe"] + r["n_risky"] == 200
        assert set(r["seconds"]) >= {"score", "split", "train", "total"}
        assert 0.0 <= r["zero_shot_top1"] <= 1.0 and r["eval_pairs"] == 200
        assert {"means", "variances", "weights"} <= set(r["mixture"])
        part = run / "splits" / f"epoch={r['epoch']}"
        split_json = json.loads((part / "split.json").read_text())
        # the split's separation beside its mixture; its warnings, if any, in the record and the summary
        assert r["separation"] == split_json["separation"] and "bhattacharyya" in r["separation"]
        assert r.get("split_warnings", []) == split_json["warnings"]
        for message in split_json["warnings"]:
            assert " ".join(message.split())[:60] in " ".join(output.split())
        assert len(safe_keys(part)) == r["n_safe"]
        assert (run / "scores" / f"epoch={r['epoch']}" / "embed.json").exists()
    if records[2]["n_safe"]:
        assert records[2]["loss_clip"] > 0 and records[2]["steps_clip"] >= 1


def test_safe_ratio_follows_the_schedule(full_run):
    from sanitize.defenses.schedule import round_count

    run, _ = full_run
    first = json.loads((run / "splits" / "epoch=2" / "split.json").read_text())
    second = json.loads((run / "splits" / "epoch=3" / "split.json").read_text())
    r0 = first["r0"]
    assert first["epoch"] == 0 and first["ratio"] == pytest.approx(r0)
    assert second["epoch"] == 1 and second["r0"] == pytest.approx(r0)
    assert second["ratio"] == pytest.approx(min(0.85, r0 + 0.01))
    assert second["counts"]["safe"] == round_count(second["ratio"], 200)
    rows = [r for f in sorted((run / "splits" / "epoch=3" / "safe").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    assert rows and all(r["partition"] == "safe" and r["epoch"] == 1 for r in rows)


def test_resume_after_kill_matches_uninterrupted(full_run, pairs_dir, tmp_path, monkeypatch):
    """Kill the run in the middle of the last epoch, resume: same weights, same metrics."""
    import sanitize.stages.pretrain as pretrain_mod

    run_full, _ = full_run
    run = tmp_path / "run"
    calls = {"steps": 0}

    class Killed(Exception):
        pass

    def step(n, losses, lr):
        calls["steps"] += 1
        if calls["steps"] == 7 + 7 + 7 + 3:  # 3 steps into epoch 3 (after 2 warm-up epochs and epoch 2)
            raise Killed

    # The CLI's own code path and options, with a step hook that dies part-way.
    hooks = pretrain_mod.Hooks
    monkeypatch.setattr(pretrain_mod, "Hooks", lambda **kw: hooks(**{**kw, "step": step}))
    with pytest.raises(Killed):
        runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), *PAPER, *ARGS, "--eval-every", "1",
                            "--eval-test", str(pairs_dir)], catch_exceptions=False)
    monkeypatch.setattr(pretrain_mod, "Hooks", hooks)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["epoch_0002.pt"]
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), "--resume", "--threads", "1"])
    assert result.exit_code == 0, result.output

    a = torch.load(run_full / "checkpoints" / "epoch_0003.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "epoch_0003.pt", weights_only=True)
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert torch.equal(a["training_state"]["banks"]["image"]["bank"], b["training_state"]["banks"]["image"]["bank"])
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "pairs_per_s", "split")}  # noqa: E731
    assert [drop(r) for r in metrics(run)] == [drop(r) for r in metrics(run_full)]
    assert safe_keys(run / "splits" / "epoch=3") == safe_keys(run_full / "splits" / "epoch=3")


def record_batch_kinds(monkeypatch) -> list[str]:
    """Which kind of batch every phase-3 step trained on: plain pairs or two views."""
    import sanitize.stages.pretrain as pretrain_mod

    seen: list[str] = []
    original = pretrain_mod.Steps.__call__

    def call(self, batch):
        seen.append(("plain" if "image" in batch else "views") + ":" + batch["loss"])
        return original(self, batch)

    monkeypatch.setattr(pretrain_mod.Steps, "__call__", call)
    return seen


def test_defense_none_never_splits(pairs_dir, tmp_path, monkeypatch):
    import sanitize.stages.split

    def no_split(*args, **kwargs):
        raise AssertionError("--defense none must not split")

    monkeypatch.setattr(sanitize.stages.split, "split", no_split)
    seen = record_batch_kinds(monkeypatch)
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), "--defense", "none",
                                 "--epochs", "2", *ARGS[6:]])
    assert result.exit_code == 0, result.output
    records = metrics(run)
    assert [r["phase"] for r in records] == ["none", "none"]  # no warm-up phases
    assert all(r["pairs"] == 200 and r["steps"] == r["steps_clip"] == 7 and "safe_ratio" not in r for r in records)
    assert not (run / "splits").exists() and not (run / "warmup.pt").exists()
    # the baseline is plain CLIP by default (the paper's), one forward per pair
    assert seen == ["plain:clip"] * 14 and {r["clip_views"] for r in records} == {"plain"}

    seen.clear()
    cross = tmp_path / "cross"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(cross), "--defense", "none",
                                 "--clip-views", "cross", "--epochs", "1", *ARGS[6:]])
    assert result.exit_code == 0, result.output
    assert seen == ["views:clip"] * 7 and metrics(cross)[0]["clip_views"] == "cross"
    assert metrics(cross)[0]["loss_clip"] != metrics(run)[0]["loss_clip"]


def test_safeclip_trains_cross_views_unless_told_plain(full_run, pairs_dir, tmp_path, monkeypatch):
    """Default: the safe set with the cross-augmented loss; --clip-views plain: the safe set
    as plain pairs while the risky set keeps its two views. The warm-up is taken from the
    full run (--warmup-from), which must end in the full run's weights when nothing else changes."""
    run_full, _ = full_run
    seen = record_batch_kinds(monkeypatch)
    run = tmp_path / "adopted"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), *PAPER, *ARGS, "--eval-every", "1",
                                 "--eval-test", str(pairs_dir), "--warmup-from", str(run_full / "warmup.pt")])
    assert result.exit_code == 0, result.output
    assert set(seen) == {"views:clip", "views:unimodal"}
    a = torch.load(run_full / "checkpoints" / "epoch_0003.pt", weights_only=True)["state_dict"]
    b = torch.load(run / "checkpoints" / "epoch_0003.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(t, b[name]) for name, t in a.items())
    assert [r["stage"] for r in metrics(run)] == ["warmup", "warmup", "pretrain", "pretrain"]

    seen.clear()
    plain = tmp_path / "plain"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(plain), *PAPER, *ARGS, "--clip-views", "plain",
                                 "--warmup-from", str(run_full / "warmup.pt")])
    assert result.exit_code == 0, result.output
    assert set(seen) == {"plain:clip", "views:unimodal"}


def test_warmup_from_must_match_the_run(full_run, pairs_dir, tmp_path):
    run_full, _ = full_run
    other = list(ARGS)
    other[other.index("--lr") + 1] = "1e-3"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(tmp_path / "a"), *other,
                                 "--warmup-from", str(run_full / "warmup.pt")])
    assert result.exit_code != 0 and "other warm-up settings (lr 0.002 vs 0.001)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "a").exists()
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(tmp_path / "b"), *ARGS,
                                 "--warmup-from", str(run_full / "checkpoints" / "epoch_0003.pt")])
    assert result.exit_code != 0 and "not a warm-up checkpoint" in result.output


def test_clip_score_and_score_from_training(pairs_dir, tmp_path):
    # clip-score: one split after warm-up at a fixed fraction, CLIP only on that safe set
    run = tmp_path / "cs"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), "--defense", "clip-score",
                                 "--ratio-schedule", "fraction:0.5", *ARGS])
    assert result.exit_code == 0, result.output
    records = metrics(run)[2:]
    assert [r["split"].endswith("epoch=2") for r in records] == [True, True]
    assert not (run / "splits" / "epoch=3").exists()
    assert all(r["steps_unimodal"] == 0 and r["pairs"] == 100 for r in records)  # top half only
    assert {r["clip_views"] for r in records} == {"plain"}  # a CLIP baseline: plain CLIP, as --defense none

    # score-from-training: epoch 3's scores come from epoch 2's training pass for the pairs it
    # trained as plain pairs (the safe set, --clip-views plain) and a no-grad pass over the rest
    run = tmp_path / "sft"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), "--score-from-training",
                                 "--clip-views", "plain", *PAPER, *ARGS])
    assert result.exit_code == 0, result.output
    records = metrics(run)
    assert [r.get("scored_by") for r in records[2:]] == ["separate pass", "training pass"]
    info = json.loads((run / "scores" / "epoch=3" / "embed.json").read_text())
    assert info["count"] == 200 and info["from_training"] == records[2]["n_safe"] > 0
    assert info["scored_now"] == 200 - records[2]["n_safe"] > 0
    assert records[2]["next_scores"] == {"from_training": info["from_training"], "scored_now": info["scored_now"]}
    before = pq.read_table(sorted((run / "scores" / "epoch=2").glob("*.parquet"))).sort_by("key")
    after = pq.read_table(sorted((run / "scores" / "epoch=3").glob("*.parquet"))).sort_by("key")
    assert before.column("key").to_pylist() == after.column("key").to_pylist()
    assert before.column("similarity").to_pylist() != after.column("similarity").to_pylist()
    assert "score" not in records[3]["seconds"] or records[3]["seconds"]["score"] < records[2]["seconds"]["score"]


def test_scores_from_training_equal_the_scoring_pass_without_learning(pairs_dir, tmp_path):
    """Without learning (a negligible lr) the reused training-pass embeddings and the no-grad pass
    give the separate pass's scores: the shortcut changes the cost, not the split."""
    slow = [a if a != "2e-3" else "1e-12" for a in ARGS]
    runs = {}
    for name, extra in (("separate", []), ("training", ["--score-from-training"])):
        runs[name] = tmp_path / name
        result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(runs[name]), "--clip-views", "plain",
                                     "--epochs", "4", *PAPER, *slow[2:], *extra])
        assert result.exit_code == 0, result.output
    tables = {name: pq.read_table(sorted((run / "scores" / "epoch=3").glob("*.parquet"))).sort_by("key")
              for name, run in runs.items()}
    a, b = (t.column("similarity").to_numpy() for t in tables.values())
    np.testing.assert_allclose(a, b, atol=2e-3)  # float16 storage; batches differ between the two
    assert safe_keys(runs["separate"] / "splits" / "epoch=3") == safe_keys(runs["training"] / "splits" / "epoch=3")


@pytest.mark.parametrize("args, message", [
    (["--epochs", "2", "--unimodal-epochs", "1", "--clip-epochs", "1"], "must be fewer than --epochs"),
    (["--model", "no-such-model"], "unknown model"),
    (["--ratio-schedule", "linear:0.2"], "unknown kind"),
    (["--defense", "clip-score", "--ratio-schedule", "safeclip"], "fixed cut"),
    (["--preset", "huge"], "unknown preset"),
    (["--clip-views", "both"], "unknown --clip-views"),
])
def test_bad_config_is_one_line_error(pairs_dir, tmp_path, args, message):
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_missing_source_fails_before_creating_the_run(tmp_path):
    result = runner.invoke(app, ["pretrain", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "no such file" in result.output
    assert not (tmp_path / "run").exists()


def test_interleave_plan_spreads_safe_batches():
    from sanitize.train.engine import interleave_plan

    plan = interleave_plan({"clip": 2, "unimodal": 6})
    assert plan.count("clip") == 2 and plan.count("unimodal") == 6
    assert plan[0] == "clip" and plan.index("clip", 1) >= 3  # spread out, not bunched
    assert interleave_plan({"clip": 0, "unimodal": 3}) == ["unimodal"] * 3
    assert interleave_plan({"clip": 2, "unimodal": 0}) == ["clip"] * 2
    three = interleave_plan({"a": 1, "b": 2, "c": 4})
    assert [three.count(x) for x in "abc"] == [1, 2, 4] and three[:3] == ["a", "b", "c"]


def test_torchrun_two_processes_split_equals_single_process(pairs_dir, tmp_path):
    from sanitize.stages.split import split

    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cli.main", "pretrain", str(pairs_dir), "--out", str(run), "--epochs", "3",
                           *PAPER, *ARGS[2:]], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pretrain done (safeclip): 3 epochs" in proc.stdout
    record = metrics(run)[-1]
    assert record["pairs"] > 0 and record["steps"] >= 1
    scores = run / "scores" / "epoch=2"
    assert json.loads((scores / "embed.json").read_text())["count"] == 200  # both ranks' shards
    single = split(scores, tmp_path / "single", "safeclip", epoch=0, seed=0)
    assert safe_keys(tmp_path / "single") == safe_keys(run / "splits" / "epoch=2")
    assert single.manifest.counts["safe"] == record["n_safe"]


def test_a_new_defense_is_one_registered_class(full_run, pairs_dir, tmp_path, monkeypatch):
    """docs/design.md's example: a class in one file plus its registration runs through the
    whole loop (split once after the warm-up, plain CLIP on the safe set, unimodal on the rest)."""
    from sanitize.defenses.base import DEFENSES, Defense, SplitRequest, Stream

    class FixedSafeSet(Defense):
        name = "fixed-90"
        trains_unimodal = True
        default_schedule = "fraction:0.9"

        def split_for(self, epoch):
            return SplitRequest(at=self.warm_epochs, schedule=self.schedule)

        def streams(self, epoch, split):
            return [Stream("clip", "clip", "safe", plain=True), Stream("unimodal", "unimodal", "risky")]

    monkeypatch.setitem(DEFENSES, "fixed-90", FixedSafeSet)
    seen = record_batch_kinds(monkeypatch)
    run_full, _ = full_run
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), "--defense", "fixed-90", *ARGS,
                                 "--warmup-from", str(run_full / "warmup.pt")])
    assert result.exit_code == 0, result.output
    records = metrics(run)[2:]
    assert [r["phase"] for r in records] == ["fixed-90", "fixed-90"]
    assert all(r["split"].endswith("epoch=2") for r in records) and not (run / "splits" / "epoch=3").exists()
    assert len(safe_keys(run / "splits" / "epoch=2")) == 180
    assert set(seen) == {"plain:clip", "views:unimodal"}
    assert all(r["pairs"] == 200 and r["steps_clip"] >= 1 and r["steps_unimodal"] >= 1 for r in records)


def test_resplit_trains_plain_clip_on_each_epochs_safe_set_only(full_run, pairs_dir, tmp_path, monkeypatch):
    """The default defense, resplit: split to the fixed share every epoch (near-duplicates grouped),
    plain CLIP on the safe set, the risky set left out, later splits scored from training."""
    run_full, _ = full_run
    seen = record_batch_kinds(monkeypatch)
    run = tmp_path / "resplit"
    result = runner.invoke(app, ["pretrain", str(pairs_dir), "--out", str(run), *ARGS, "--epochs", "5",
                                 "--warmup-from", str(run_full / "warmup.pt")])
    assert result.exit_code == 0, result.output
    assert "pretrain done (resplit)" in result.output
    records = metrics(run)[2:]
    assert set(seen) == {"plain:clip"}
    assert [r["n_safe"] for r in records] == [170] * 3 and all(r["steps_unimodal"] == 0 for r in records)
    assert all(r["pairs"] == 170 for r in records)  # the risky 30 are not trained on
    # the first two splits by a separate pass, the third from the second epoch's training pass
    assert [r.get("scored_by") for r in records] == ["separate pass", "separate pass", "training pass"]
    for epoch in (2, 3, 4):
        manifest = json.loads((run / "splits" / f"epoch={epoch}" / "split.json").read_text())
        assert manifest["dedup"]["tau"] == 0.9999 and manifest["schedule"]["fraction"] == 0.85
        assert not any("--previous" in w for w in manifest["warnings"])  # a fixed share has no r0 to carry
    # the groups are found once, at the first split, and reused by key
    assert (run / "splits" / "epoch=2" / "groups.parquet").exists()
    for epoch in (3, 4):
        later = json.loads((run / "splits" / f"epoch={epoch}" / "split.json").read_text())["dedup"]
        assert later["groups_from"].endswith("epoch=2/groups.parquet")


@pytest.mark.parametrize("defense, options, expected", [
    ("resplit", {}, [False, False, True, True]),  # the default: the first two splits by a separate pass
    ("resplit", {"score_from_training": False}, [False] * 4),
    ("safeclip", {"score_from_training": True}, [False, True, True, True]),
    ("safeclip", {}, [False] * 4),
])
def test_which_splits_reuse_the_training_pass(defense, options, expected):
    from sanitize.defenses import make_defense
    from sanitize.stages.config import PretrainConfig

    chosen = make_defense(PretrainConfig.from_options(defense=defense, epochs=8, **options))
    first = chosen.warm_epochs
    assert [chosen.split_for(first + k).from_training for k in range(4)] == expected


def test_default_defense_is_resplit_and_the_paper_preset_runs_the_papers_loop():
    from sanitize.stages.config import PretrainConfig

    assert PretrainConfig.from_options().defense == "resplit"
    assert PretrainConfig.from_options("cpu").defense == "resplit"
    assert PretrainConfig.from_options("paper").defense == "safeclip"
    assert PretrainConfig.from_options("paper", defense="resplit").defense == "resplit"  # options win
