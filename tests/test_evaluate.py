"""Evaluation metrics on hand-built embeddings and predictions, and the prompt sets."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sanitize.evaluation.evaluate import backdoors_in, label_of, targets_in
from sanitize.evaluation.metrics import (attack_success, auroc, detection_metrics, linear_probe, per_class_accuracy,
                                         predict, targeted_success, topk_accuracy, zero_shot_report,
                                         zero_shot_scores, zero_shot_weights)
from sanitize.io.fashion_mnist import CAPTION_TEMPLATES, CLASS_SYNONYMS, CONTEXTS, FASHION_MNIST_CLASSES, class_words
from sanitize.evaluation.templates import (DEFAULT_TEMPLATES, FASHION_MNIST_PROMPT_NAMES, check_templates, load_classes,
                                load_templates, prompts)
from sanitize.attacks.triggers import badnet_spec, wanet_spec


# ---- zero-shot ------------------------------------------------------------------------

def test_zero_shot_weights_normalise_each_prompt_before_averaging():
    e = np.eye(3, dtype=np.float32)
    # Class 0: one long prompt along x, one unit prompt along y -> the ensemble must sit at 45°,
    # not be dragged to x by the long vector. Class 1: both along z.
    text = np.stack([np.stack([10 * e[0], e[1]]), np.stack([e[2], 3 * e[2]])])
    weights = zero_shot_weights(text)
    assert weights.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[0], [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
    np.testing.assert_allclose(weights[1], [0, 0, 1], atol=1e-6)
    with pytest.raises(ValueError):
        zero_shot_weights(text[0])


def test_zero_shot_argmax_picks_nearest_class_weight():
    rng = np.random.default_rng(0)
    classes = rng.normal(size=(4, 16))
    text = classes[:, None, :] + 0.05 * rng.normal(size=(4, 5, 16))       # 5 templates per class
    labels = rng.integers(0, 4, size=200)
    images = 3 * classes[labels] + rng.normal(size=(200, 16))             # unnormalised on purpose
    scores = zero_shot_scores(images, zero_shot_weights(text))
    assert scores.shape == (200, 4)
    assert np.abs(scores).max() <= 1 + 1e-5                              # cosines: images were normalised
    pred = predict(scores)
    assert np.mean(pred == labels) > 0.9
    # Moving every image onto class 2's weight makes class 2 the argmax everywhere.
    assert (predict(zero_shot_scores(np.tile(zero_shot_weights(text)[2], (7, 1)), zero_shot_weights(text))) == 2).all()


def test_topk_and_per_class_accuracy():
    scores = np.array([[0.9, 0.1, 0.0],    # label 0: top-1 hit
                       [0.5, 0.4, 0.1],    # label 1: top-2 hit only
                       [0.6, 0.3, 0.1],    # label 2: miss even at top-2
                       [0.0, 0.2, 0.8]])   # label 2: top-1 hit
    labels = np.array([0, 1, 2, 2])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(0.5)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(0.75)
    assert topk_accuracy(scores, labels, 5) == pytest.approx(1.0)  # k capped at 3 classes
    counts, accuracy = per_class_accuracy(predict(scores), labels, 4)
    assert counts.tolist() == [1, 1, 2, 0]
    assert accuracy[:3].tolist() == [1.0, 0.0, 0.5] and np.isnan(accuracy[3])


def test_zero_shot_report_leaves_out_unknown_labels():
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    report = zero_shot_report(scores, np.array([0, 0, -1]), ["a", "b"])
    assert report["n"] == 2 and report["top1"] == pytest.approx(0.5) and report["top5_k"] == 2
    assert [r["n"] for r in report["per_class"]] == [2, 0]


# ---- linear probe ---------------------------------------------------------------------

def test_linear_probe_learns_separable_features_and_is_seeded():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4.0, size=(3, 8))
    train_y, test_y = rng.integers(0, 3, 300), rng.integers(0, 3, 100)
    train_x = centres[train_y] + rng.normal(size=(300, 8)) + 100.0   # far from the origin: needs standardising
    test_x = centres[test_y] + rng.normal(size=(100, 8)) + 100.0
    first = linear_probe(train_x, train_y, test_x, test_y, seed=3)
    assert first["accuracy"] > 0.95 and first["converged"] and first["train_n"] == 300
    assert linear_probe(train_x, train_y, test_x, test_y, seed=3) == first
    shuffled = linear_probe(train_x, rng.permutation(train_y), test_x, test_y, seed=3)
    assert shuffled["accuracy"] < 0.7                                  # labels matter
    with pytest.raises(ValueError, match="2 classes"):
        linear_probe(train_x, np.zeros(300, int), test_x, test_y)


# ---- attacks --------------------------------------------------------------------------

def test_asr_excludes_target_class_images():
    target = 1
    labels = np.array([1, 1, 1, 1, 0, 0, 2, 2, -1])
    # Every target-class image is (correctly) predicted as the target, with or without the
    # trigger; counting them would inflate the ASR to 6/8. Of the 4 others, 3 flip.
    triggered = np.array([1, 1, 1, 1, 1, 1, 1, 2, 1])
    clean = np.array([1, 1, 1, 1, 0, 1, 2, 2, 1])
    result = attack_success(triggered, clean, labels, target)
    assert result["n"] == 4 and result["excluded_target_class"] == 4
    assert result["asr"] == pytest.approx(3 / 4)
    assert result["no_trigger"] == pytest.approx(1 / 4)
    assert result["lift"] == pytest.approx(2 / 4)
    empty = attack_success(triggered, clean, np.array([1] * 9), target)
    assert empty["n"] == 0 and empty["asr"] is None


def test_targeted_success_counts_x_of_n_with_the_list():
    classes = ["a", "b", "c"]
    keys = ["k0", "k1", "k2", "k3"]
    pred = np.array([2, 0, 1, 1])
    result = targeted_success(["k0", "k1", "k3", "gone"], [2, 2, 1, 0], keys, pred, classes, ["a", "b", "c", None])
    assert (result["success"], result["total"]) == (2, 3)
    assert result["rate"] == pytest.approx(2 / 3)
    assert [(t["key"], t["predicted"], t["success"]) for t in result["targets"]] == [
        ("k0", "c", True), ("k1", "a", False), ("k3", "b", True)]
    assert result["missing"] == ["gone"]


def test_manifest_backdoors_and_targets():
    bad, warp = json.dumps(badnet_spec(), sort_keys=True), json.dumps(wanet_spec(seed=2), sort_keys=True)
    row = dict(true_class="bag", source_key="s", run=0)
    rows = [dict(row, key="c", attack=None, kind="clean", target_class=None, trigger=None)]
    rows += [dict(row, key=f"b{i}", attack="badnet", kind="poison", target_class="trouser", trigger=bad)
             for i in range(3)]
    rows += [dict(row, key=f"w{i}", attack="wanet", kind="poison", target_class="coat", trigger=warp, run=1)
             for i in range(2)]
    rows += [dict(row, key=f"b2-{i}", attack="badnet", kind="poison", target_class="bag", trigger=bad, run=2)
             for i in range(1)]
    rows += [dict(row, key=f"t{i}", attack="targeted", kind="poison", target_class="shirt", trigger=None,
                  source_key=f"test-{i % 2}", run=3) for i in range(6)]
    backdoors = backdoors_in(rows)
    assert [(b["name"], b["target_class"], b["poisons"]) for b in backdoors] == [
        ("badnet#0", "trouser", 3), ("badnet#2", "bag", 1), ("wanet", "coat", 2)]
    assert backdoors[2]["trigger"] == wanet_spec(seed=2)
    targets = targets_in(rows)
    assert sorted((t["source_key"], t["adversarial_class"], t["copies"]) for t in targets) == [
        ("test-0", "shirt", 3), ("test-1", "shirt", 3)]


def test_label_of_prefers_class_name_then_integer_label():
    index = {name: i for i, name in enumerate(["cat", "dog", "fox"])}
    assert label_of({"class_name": "fox", "label": 0}, index) == 2
    assert label_of({"class_name": "t-shirt", "label": 1}, index) == 1
    assert label_of({"label": 3}, index) == -1
    assert label_of({"label": True}, index) == -1
    assert label_of({"label": "1"}, index) == -1
    assert label_of({}, index) == -1


# ---- detection ------------------------------------------------------------------------

def test_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(5)
    positive = rng.random(500) < 0.1
    score = np.round(rng.random(500) + 0.3 * positive, 1)  # rounded: many ties
    assert auroc(positive, score) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)
    assert auroc(np.ones(3, bool), score[:3]) is None


def _split_fixture():
    """10 pairs ranked 0..9 (0 = most clean); safe = ranks 0..4."""
    #            rank: 0        1        2        3         4        5         6        7         8         9
    kind = np.array(["clean", "clean", "clean", "poison", "clean", "noise", "clean", "poison", "poison", "poison"],
                    dtype=object)
    attack = np.array([None, None, None, "badnet", None, None, None, "targeted", "badnet", "targeted"],
                      dtype=object)
    rank = np.arange(10)
    p_clean = np.array([0.99, 0.98, 0.97, 0.95, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1])
    return kind, attack, rank >= 5, p_clean, rank


def test_detection_recall_precision_and_first_poison():
    kind, attack, risky, p_clean, rank = _split_fixture()
    order = np.random.default_rng(0).permutation(10)  # input order must not matter
    d = detection_metrics(kind[order], attack[order], risky[order], p_clean[order], rank[order])
    assert (d["n"], d["safe"], d["risky"], d["poisons"], d["clean"]) == (10, 5, 5, 4, 5)
    rows = {r["name"]: r for r in d["rows"]}
    assert set(rows) == {"badnet", "targeted", "all poisons", "noise"}
    assert (rows["badnet"]["in_risky"], rows["badnet"]["in_safe"]) == (1, 1)
    assert rows["badnet"]["recall"] == pytest.approx(0.5) and rows["badnet"]["precision"] == pytest.approx(1 / 5)
    assert rows["targeted"]["recall"] == pytest.approx(1.0) and rows["targeted"]["precision"] == pytest.approx(2 / 5)
    assert rows["all poisons"]["recall"] == pytest.approx(3 / 4)
    # First poison at rank 3: a safe set of the top 3 pairs (30%) holds none; the split's
    # 50% safe set is past it, so the headroom is negative.
    assert d["first_poison_rank"] == 3 and d["poison_free_share"] == pytest.approx(0.3)
    assert d["headroom"] == pytest.approx(0.3 - 0.5)
    assert rows["targeted"]["first_rank"] == 7 and rows["targeted"]["poison_free_share"] == pytest.approx(0.7)
    # AUROC of 1 - p_clean, poison vs clean only (noise left out).
    keep = (kind == "poison") | (kind == "clean")
    assert d["auroc"] == pytest.approx(roc_auc_score(kind[keep] == "poison", 1 - p_clean[keep]))
    t = (attack == "targeted") | (kind == "clean")
    assert rows["targeted"]["auroc"] == pytest.approx(1.0)
    assert rows["targeted"]["auroc"] == pytest.approx(roc_auc_score(attack[t] == "targeted", -p_clean[t]))


def test_detection_with_rank_gaps_and_no_poison():
    kind, attack, risky, p_clean, rank = _split_fixture()
    d = detection_metrics(kind, attack, risky, p_clean, rank * 10 + 7)   # same order, gappy numbers
    assert d["first_poison_rank"] == 3 and d["poison_free_share"] == pytest.approx(0.3)
    clean = np.array(["clean"] * 4, dtype=object)
    none = detection_metrics(clean, np.array([None] * 4, dtype=object), np.array([0, 0, 1, 1], bool),
                             np.linspace(1, 0, 4), np.arange(4))
    assert none["poisons"] == 0 and none["first_poison_rank"] is None and none["auroc"] is None


# ---- templates and classes ------------------------------------------------------------

def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_default_templates_differ_from_training_captions():
    assert len(DEFAULT_TEMPLATES) >= 10 and len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert check_templates(DEFAULT_TEMPLATES) == list(DEFAULT_TEMPLATES)
    # Every caption a training template can make from a class word (with or without an
    # article, with any context), compared without punctuation or case.
    captions = set()
    for name in FASHION_MNIST_CLASSES:
        for word in {name, *(w for w, _ in CLASS_SYNONYMS[name])}:
            for a_item in (f"a {word}", f"an {word}", f"a pair of {word}", f"some {word}", word):
                for template in CAPTION_TEMPLATES:
                    for context in CONTEXTS:
                        captions.add(_norm(template.format(a_item=a_item, item=word, context=context)))
    for names in (FASHION_MNIST_CLASSES, FASHION_MNIST_PROMPT_NAMES):
        for prompt in prompts(names, list(DEFAULT_TEMPLATES)):
            assert _norm(prompt) not in captions, prompt


def test_builtin_prompt_names_are_words_captions_use():
    fashion = load_classes("fashion-mnist")
    assert fashion.names == FASHION_MNIST_CLASSES and len(fashion.prompt_names) == len(fashion.names)
    for name, words in zip(fashion.names, fashion.prompt_names):
        assert words in class_words(name)


def test_load_classes_and_templates(tmp_path):
    listed = load_classes(" cat, dog ,fox ")
    assert listed.names == ("cat", "dog", "fox") and listed.prompt_names == listed.names
    names = tmp_path / "classes.txt"
    names.write_text("# my classes\ncat = house cat\n\ndog\n")
    from_file = load_classes(str(names))
    assert from_file.names == ("cat", "dog") and from_file.prompt_names == ("house cat", "dog")
    for bad, message in (("imagenet", "not a built-in"), ("cat,", "at least 2"), ("cat,dog,cat", "duplicate"),
                         ("cat=,dog", "both sides")):
        with pytest.raises(ValueError, match=message):
            load_classes(bad)
    good = tmp_path / "t.txt"
    good.write_text("a {} here.\n# comment\n\nitap of the {}\n")
    assert load_templates(good) == ["a {} here.", "itap of the {}"]
    assert prompts(["x", "y"], load_templates(good)) == ["a x here.", "itap of the x", "a y here.", "itap of the y"]
    assert load_templates() == list(DEFAULT_TEMPLATES)
    for text, message in (("no slot\n", "exactly one"), ("{} and {}\n", "exactly one"),
                          ("{} {name}\n", "other than"), ("\n# only\n", "no templates")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_templates(bad)
    with pytest.raises(FileNotFoundError):
        load_templates(tmp_path / "missing.txt")
