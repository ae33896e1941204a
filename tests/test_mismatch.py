"""The mismatched share estimated from a shuffled-caption null, and the `estimate` schedule."""

import json

import numpy as np
import pytest

from emb_synth import write_emb
from sanitize.defenses.gmm import fit_mixture
from sanitize.defenses.mismatch import estimate_from_files, mismatched_share, read_sample
from sanitize.defenses.schedule import parse_schedule, plan_split
from sanitize.stages.split import split


def captioned_pairs(n: int, mismatched: float, rng: np.random.Generator, classes: int = 10, dim: int = 32,
                    spread: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and text unit embeddings around class prototypes; a `mismatched` share of the
    captions describes another class. Returns (image, text, is_mismatched)."""
    prototypes = rng.normal(size=(classes, dim))
    label = rng.integers(0, classes, n)
    bad = rng.random(n) < mismatched
    caption_label = np.where(bad, (label + rng.integers(1, classes, n)) % classes, label)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    image = unit(prototypes[label] + spread * rng.normal(size=(n, dim)))
    text = unit(prototypes[caption_label] + spread * rng.normal(size=(n, dim)))
    return image, text, bad


@pytest.mark.parametrize("truth", [0.0, 0.03, 0.2, 0.5])
def test_estimate_follows_the_true_mismatched_share(truth):
    image, text, bad = captioned_pairs(20000, truth, np.random.default_rng(1))
    estimate = mismatched_share(image, text, np.einsum("ij,ij->i", image, text))
    # it errs high, on the safe side: a shuffled caption fits its image 1 time in 10 here, so
    # the null's low tail is 0.9 x a mismatched pair's and the estimate about truth / 0.9
    assert bad.mean() - 0.01 <= estimate.share <= bad.mean() / 0.9 + 0.02, (estimate, bad.mean())
    assert estimate.sample == 20000


def test_estimate_is_not_the_mixture_weight_of_a_long_clean_tail():
    # widely spread clean pairs score low, but still above a random caption: the mixture's low
    # component takes the tail, the null estimate does not
    rng = np.random.default_rng(2)
    image, text, bad = captioned_pairs(20000, 0.05, rng, classes=10, spread=1.6)
    similarity = np.einsum("ij,ij->i", image, text)
    mixture = fit_mixture(similarity.astype(np.float64))
    assert mixture.weights[int(np.argmin(mixture.means))] > 0.3  # the tail the mixture misreads
    estimate = mismatched_share(image, text, similarity)
    assert bad.mean() - 0.01 <= estimate.share <= bad.mean() / 0.9 + 0.02, (estimate, bad.mean())


def test_too_few_pairs_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_share(np.ones((1, 4)), np.ones((1, 4)), np.ones(1))


def test_read_sample_takes_the_given_rows_across_files(tmp_path):
    rng = np.random.default_rng(3)
    vectors, sims = {}, {}
    for name, n in (("a", 50), ("b", 70), ("c", 30)):
        image, text, _ = captioned_pairs(n, 0.1, rng, dim=8)
        vectors[name], sims[name] = (image, text), np.einsum("ij,ij->i", image, text)
    emb = write_emb(tmp_path / "emb", sims, vectors=vectors, dtype=np.float32)
    paths = [str(emb / f"{name}.parquet") for name in vectors]
    rows = np.array([0, 49, 50, 119, 120, 149])
    image, text = read_sample(paths, [50, 70, 30], rows)
    every_image = np.concatenate([v[0] for v in vectors.values()])
    every_text = np.concatenate([v[1] for v in vectors.values()])
    np.testing.assert_allclose(image, every_image[rows], atol=1e-6)
    np.testing.assert_allclose(text, every_text[rows], atol=1e-6)
    # a sample smaller than the data is seeded: the same seed, the same estimate
    similarity = np.concatenate(list(sims.values()))
    first = estimate_from_files(paths, [50, 70, 30], similarity, seed=4, sample=100)
    assert first == estimate_from_files(paths, [50, 70, 30], similarity, seed=4, sample=100)
    assert first.sample == 100


def test_estimate_schedule_parses_with_defaults_and_limits():
    s = parse_schedule("estimate")
    assert (s.kind, s.margin, s.cap, s.floor) == ("estimate", 0.01, 0.95, 0.3)
    s = parse_schedule("estimate:margin=0.05, floor=0.5")
    assert (s.margin, s.cap, s.floor) == (0.05, 0.95, 0.5)
    with pytest.raises(ValueError, match="expected margin=, cap=, floor="):
        parse_schedule("estimate:step=0.1")
    with pytest.raises(ValueError, match="above cap"):
        parse_schedule("estimate:floor=0.9,cap=0.8")


def test_estimate_plan_is_one_minus_the_share_and_margin_within_floor_and_cap():
    p_clean = np.linspace(0, 1, 1000)
    s = parse_schedule("estimate:margin=0.02,cap=0.9,floor=0.4")
    assert plan_split(s, 3, p_clean, mismatched=0.2).n_safe == 780
    assert plan_split(s, 3, p_clean, mismatched=0.01).ratio == 0.9     # capped
    assert plan_split(s, 3, p_clean, mismatched=0.9).ratio == 0.4      # floored
    with pytest.raises(ValueError, match="mismatched"):
        plan_split(s, 3, p_clean)


def test_split_with_the_estimate_schedule_keeps_about_the_clean_share(tmp_path):
    rng = np.random.default_rng(5)
    vectors, sims, bad = {}, {}, []
    for name in ("00000", "00001"):
        image, text, is_bad = captioned_pairs(3000, 0.2, rng)
        vectors[name], sims[name] = (image, text), np.einsum("ij,ij->i", image, text)
        bad.append(is_bad)
    emb = write_emb(tmp_path / "emb", sims, vectors=vectors, dtype=np.float32)
    result = split(emb, tmp_path / "split", "estimate")
    manifest = json.loads((tmp_path / "split" / "split.json").read_text())
    truth = np.concatenate(bad).mean()
    assert truth - 0.01 <= manifest["mismatched"]["share"] <= truth / 0.9 + 0.02
    assert manifest["ratio"] == pytest.approx(1 - manifest["mismatched"]["share"] - 0.01, abs=1e-4)
    assert manifest["counts"]["safe"] == result.manifest.counts["safe"]
    assert 1 - truth - 0.05 <= manifest["counts"]["safe_share"] <= 1 - truth
