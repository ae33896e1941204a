"""`safeclip eval` end to end on a slice of the bundled Fashion-MNIST sample, with a
hand-made poison manifest and split, checked against an independent computation."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cli.main import app
from helpers import make_pairs
from sanitize.io.fashion_mnist import FASHION_MNIST_CLASSES, sample_path
from sanitize.io.pairs import open_pairs
from sanitize.io.shards import write_pairs
from sanitize.evaluation.templates import DEFAULT_TEMPLATES, FASHION_MNIST_PROMPT_NAMES
from sanitize.attacks.triggers import badnet_spec, blended_spec, trigger_from_spec

N_TEST, N_TRAIN = 120, 120
BADNET = badnet_spec(size=4, position="top-left")
BLENDED = blended_spec(alpha=0.3, seed=4)


def _cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Test and train slices of the bundled test split, a manifest with two backdoors and
    three TDPA targets, and a hand-made split whose detection numbers are known."""
    root = tmp_path_factory.mktemp("eval")
    pairs = list(itertools.islice(open_pairs(str(sample_path() / "test")), N_TEST + N_TRAIN))
    test, train = pairs[:N_TEST], pairs[N_TEST:]
    write_pairs(test, root / "test", samples_per_shard=50)
    write_pairs(train, root / "train", samples_per_shard=100)

    row = dict(true_class="bag", source_key="x", run=0)
    rows = [dict(row, key=f"clean-{i}", attack=None, kind="clean", target_class=None, trigger=None, run=None)
            for i in range(6)]
    rows += [dict(row, key=f"poison-badnet-{i}", attack="badnet", kind="poison", target_class="trouser",
                  trigger=json.dumps(BADNET, sort_keys=True)) for i in range(4)]
    rows += [dict(row, key=f"poison-label-consistent-{i}", attack="label-consistent", kind="poison",
                  target_class="bag", trigger=json.dumps(BLENDED, sort_keys=True), run=1) for i in range(2)]
    targets = [(test[0].key, "bag"), (test[5].key, "coat"), (test[9].key, "sandal")]
    rows += [dict(row, key=f"poison-targeted-{j}-{c}", attack="targeted", kind="poison", target_class=adv,
                  trigger=None, source_key=key, true_class=None, run=2)
             for j, (key, adv) in enumerate(targets) for c in range(2)]
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)

    # Split: ranks by list order; safe = the first 7. Badnet: 1 of 4 leaked (rank 5); the
    # label-consistent and targeted poisons are all risky.
    order = (["clean-0", "clean-1", "clean-2", "clean-3", "clean-4", "poison-badnet-0", "clean-5"]
             + [r["key"] for r in rows if r["kind"] == "poison" and r["key"] != "poison-badnet-0"])
    part = root / "part"
    for name, keys in (("safe", order[:7]), ("risky", order[7:])):
        (part / name).mkdir(parents=True)
        ranks = [order.index(k) for k in keys]
        pq.write_table(pa.table({"key": keys, "p_clean": [1.0 - r / len(order) for r in ranks],
                                 "rank": pa.array(ranks, pa.int64()), "partition": [name] * len(keys)}),
                       part / name / "00000.parquet")
    # The manifest a finished split ends with (consumers refuse a split without it).
    (part / "split.json").write_text(json.dumps({"counts": {"safe": 7, "risky": len(order) - 7},
                                                 "input_files": [{"name": "00000.parquet", "rows": len(order)}]}))
    return {"root": root, "test": root / "test", "train": root / "train", "manifest": manifest, "part": part,
            "pairs": test, "targets": targets}


def _reference_predictions(checkpoint, pairs, change=None) -> np.ndarray:
    """Zero-shot predictions computed here, straight from open_clip's pieces."""
    import open_clip

    from sanitize.models.checkpoint import load_checkpoint

    model, tokenizer, size, _config, _state = load_checkpoint(str(checkpoint))
    model.eval()
    preprocess = open_clip.image_transform(size, is_train=False)
    with torch.no_grad():
        weights = []
        for name in FASHION_MNIST_PROMPT_NAMES:
            emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in DEFAULT_TEMPLATES])), dim=-1)
            weights.append(F.normalize(emb.mean(0), dim=0))
        images = torch.stack([preprocess(change(p.image) if change else p.image) for p in pairs])
        logits = F.normalize(model.encode_image(images), dim=-1) @ torch.stack(weights).T
    return logits.argmax(1).numpy()


def test_eval_end_to_end(data, tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    result = _cli("eval", tiny_checkpoint, "--test", data["test"], "--classes", "fashion-mnist",
                  "--train", data["train"], "--manifest", data["manifest"], "--split", data["part"],
                  "--json", "--out", out, "--batch-size", 32)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text())

    labels = np.array([p.meta["label"] for p in data["pairs"]])
    zs = printed["zero_shot"]
    assert zs["n"] == N_TEST and printed["test"]["pairs"] == N_TEST
    assert [r["n"] for r in zs["per_class"]] == np.bincount(labels, minlength=10).tolist()
    pred = _reference_predictions(tiny_checkpoint, data["pairs"])
    assert zs["top1"] == pytest.approx(np.mean(pred == labels))
    for c, row in enumerate(zs["per_class"]):
        assert row["class"] == FASHION_MNIST_CLASSES[c]
        assert row["accuracy"] == (pytest.approx(np.mean(pred[labels == c] == c)) if row["n"] else None)

    # Backdoors: one row per attack in the manifest, trigger from the manifest, target images left out.
    rows = {b["attack"]: b for b in printed["backdoor"]}
    assert set(rows) == {"badnet", "label-consistent"}
    trouser, bag = FASHION_MNIST_CLASSES.index("trouser"), FASHION_MNIST_CLASSES.index("bag")
    assert rows["badnet"]["n"] == int(np.sum(labels != trouser))
    assert rows["label-consistent"]["n"] == int(np.sum(labels != bag))
    assert rows["badnet"]["trigger"] == BADNET and rows["badnet"]["poisons"] == 4
    triggered = _reference_predictions(tiny_checkpoint, data["pairs"], trigger_from_spec(BADNET))
    assert (triggered != pred).any()  # else this check could not tell a missing trigger apart
    assert rows["badnet"]["asr"] == pytest.approx(np.mean(triggered[labels != trouser] == trouser))
    assert rows["badnet"]["no_trigger"] == pytest.approx(np.mean(pred[labels != trouser] == trouser))

    targeted = printed["targeted"]
    assert targeted["total"] == 3 and not targeted["missing"]
    assert [t["key"] for t in targeted["targets"]] == [k for k, _ in data["targets"]]
    index = {p.key: i for i, p in enumerate(data["pairs"])}
    expected = sum(FASHION_MNIST_CLASSES[pred[index[k]]] == adv for k, adv in data["targets"])
    assert targeted["success"] == expected

    probe = printed["linear_probe"]
    assert probe["train_n"] == N_TRAIN and probe["test_n"] == N_TEST and 0.0 <= probe["accuracy"] <= 1.0

    d = printed["detection"]
    assert (d["n"], d["safe"], d["risky"], d["poisons"], d["clean"]) == (18, 7, 11, 12, 6)
    det = {r["name"]: r for r in d["rows"]}
    assert det["badnet"]["recall"] == pytest.approx(0.75) and det["badnet"]["in_safe"] == 1
    assert det["targeted"]["recall"] == pytest.approx(1.0) and det["targeted"]["precision"] == pytest.approx(6 / 11)
    assert d["first_poison_rank"] == 5 and d["poison_free_share"] == pytest.approx(5 / 18)
    assert det["targeted"]["auroc"] == pytest.approx(1.0)


def test_eval_prints_tables_and_summary(data, tiny_checkpoint, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a studio photo of the {}.\nsomeone's {}\n")
    result = _cli("eval", tiny_checkpoint, "--test", data["test"], "--classes", "fashion-mnist",
                  "--templates", templates, "--manifest", data["manifest"])
    assert result.exit_code == 0, result.output
    assert "zero-shot top-1" in result.stdout and "backdoor attack success" in result.stdout
    assert "targeted poisoning: " in result.stdout and "ankle boot" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("eval: zero-shot top-1") and "badnet ASR" in last and "targeted " in last


def test_eval_bad_input(data, tiny_checkpoint, tmp_path):
    base = ["eval", tiny_checkpoint, "--test", data["test"]]
    _one_line_error(_cli("eval", tmp_path / "none.pt", "--test", data["test"], "--classes", "fashion-mnist"),
                    "not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    _one_line_error(_cli("eval", corrupt, "--test", data["test"], "--classes", "fashion-mnist"), "checkpoint")
    _one_line_error(_cli(*base, "--classes", "imagenet"), "built-in")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--out", tmp_path / "no" / "r.json"), "no such folder")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--test", tmp_path / "nowhere"))
    _one_line_error(_cli(*base, "--classes", "t-shirt,trouser,pullover", "--manifest", data["manifest"]),
                    "bag", "--classes")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--poison-dir", tmp_path), "manifest")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--truth", data["manifest"]), "--split")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--split", tmp_path), "not a split")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--split", data["part"]), "--truth")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--split", data["part"], "--truth",
                         tmp_path / "none.parquet"), "no such poison manifest")
    bad_templates = tmp_path / "bad.txt"
    bad_templates.write_text("a photo of something\n")
    _one_line_error(_cli(*base, "--classes", "fashion-mnist", "--templates", bad_templates), "{}")
    unlabelled = tmp_path / "unlabelled"
    pairs = make_pairs(6)
    for pair in pairs:
        pair.meta = {}
    write_pairs(pairs, unlabelled)
    _one_line_error(_cli("eval", tiny_checkpoint, "--test", unlabelled, "--classes", "fashion-mnist"),
                    "no test pair has a class")
