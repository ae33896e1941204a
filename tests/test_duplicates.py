"""Near-duplicate image groups keep at most one pair in the safe set (defenses/duplicates.py):
copies of one image with high-scoring captions — targeted poisoning's signature — are grouped,
distinct images are not, and the safe count is filled by the next-best pairs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emb_synth import unit_pairs, write_embed_manifest
from sanitize.defenses.duplicates import find_groups, one_per_group
from sanitize.stages.split import split

DIM = 16


def _write(emb, image: np.ndarray, similarity: np.ndarray) -> None:
    emb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    _, text = unit_pairs(similarity.astype(np.float64), DIM, rng)
    keys = [f"{i:06d}" for i in range(len(image))]
    vectors = lambda m: pa.FixedSizeListArray.from_arrays(pa.array(m.astype(np.float16).reshape(-1)), DIM)  # noqa: E731
    pq.write_table(pa.table({"key": keys, "caption": [f"caption {k}" for k in keys],
                             "image_emb": vectors(image), "text_emb": vectors(text),
                             "similarity": pa.array(similarity, pa.float32())}), emb / "00000.parquet")
    write_embed_manifest(emb)


def _data(n: int = 400, copies: int = 20):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(n, DIM)) + 3.0  # a narrow cone, as after a short warm-up
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    image[:copies] = image[0]                                     # one image, `copies` times
    image[copies] = image[0] + rng.normal(scale=1e-4, size=DIM)   # and a near-identical copy
    image[copies] /= np.linalg.norm(image[copies])
    similarity = np.where(np.arange(n) <= copies, 0.45, rng.normal(0.3, 0.05, n)).astype(np.float32)
    similarity[n - 60:] = rng.normal(0.02, 0.03, 60)  # a risky bump
    return image, similarity


def test_groups_join_copies_and_near_copies_only(tmp_path):
    image, similarity = _data()
    _write(tmp_path / "emb", image, similarity)
    groups = find_groups([str(tmp_path / "emb" / "00000.parquet")], len(image))
    assert groups.summary() == {"tau": 0.9999, "groups": 1, "pairs_in_groups": 21, "largest_group": 21}
    assert (groups.labels[:21] == groups.labels[0]).all() and (groups.labels[21:] == -1).all()


def test_one_per_group_keeps_the_best_and_refills_the_safe_count():
    order = np.array([5, 2, 7, 1, 0, 3, 6, 4])
    labels = np.array([-1, 9, 9, -1, 9, -1, -1, -1])  # rows 1, 2, 4: one group
    out, moved = one_per_group(order, labels, n_safe=4)
    assert out.tolist() == [5, 2, 7, 0, 1, 4, 3, 6] and moved == 1  # row 1 out, row 0 in
    assert sorted(out.tolist()) == list(range(8))
    out, moved = one_per_group(order, labels, n_safe=8)  # everything safe: nothing can leave
    assert moved == 0 and sorted(out[:8].tolist()) == list(range(8))


def test_a_group_larger_than_the_limit_keeps_none_in_the_safe_set():
    order = np.array([5, 2, 7, 1, 0, 3, 6, 4])
    labels = np.array([-1, 9, 9, -1, 9, -1, 8, 8])  # rows 1, 2, 4: a group of 3; rows 6, 7: of 2
    out, moved = one_per_group(order, labels, n_safe=4, max_group=2)
    assert out[:4].tolist() == [5, 7, 0, 3] and moved == 2  # rows 2 and 1 out; 0 and 3 in
    assert sorted(out.tolist()) == list(range(8))
    out, _ = one_per_group(order, labels, n_safe=4, max_group=3)  # within the limit: its best stays
    assert out[:4].tolist() == [5, 2, 7, 0]


def test_split_with_dedup_admits_no_copy_of_a_large_group(tmp_path):
    image, similarity = _data()
    _write(tmp_path / "emb", image, similarity)
    plain = split(tmp_path / "emb", tmp_path / "plain", "fraction:0.8").manifest
    dedup = split(tmp_path / "emb", tmp_path / "dedup", "fraction:0.8", dedup=0.9999).manifest

    def safe(part):
        return set(pq.read_table(tmp_path / part / "safe" / "00000.parquet").column("key").to_pylist())

    copies = {f"{i:06d}" for i in range(21)}
    assert copies <= safe("plain")  # high similarity: every copy is safe without grouping
    assert not copies & safe("dedup")  # 21 copies: more than MAX_KEPT_GROUP, none kept
    assert plain.counts["safe"] == dedup.counts["safe"] == 320  # the count is the schedule's, refilled
    assert dedup.extra["dedup"] == {"tau": 0.9999, "groups": 1, "pairs_in_groups": 21, "largest_group": 21,
                                    "left_safe_set": 21}
    written = json.loads((tmp_path / "dedup" / "split.json").read_text())
    assert written["dedup"]["left_safe_set"] == 21 and "dedup" not in plain.extra


def test_hash_buckets_find_the_same_groups_at_scale(tmp_path):
    """Beyond the exact search's limit, SimHash buckets find the copies and the near-copy too."""
    image, similarity = _data(n=2000, copies=20)
    _write(tmp_path / "emb", image, similarity)
    path = [str(tmp_path / "emb" / "00000.parquet")]
    exact = find_groups(path, len(image))
    hashed = find_groups(path, len(image), exact_limit=100)
    assert hashed.summary() == exact.summary() == {"tau": 0.9999, "groups": 1, "pairs_in_groups": 21,
                                                   "largest_group": 21}
    assert (hashed.labels >= 0).tolist() == (exact.labels >= 0).tolist()


def test_a_later_split_reuses_the_first_splits_groups_by_key(tmp_path):
    """Copies embedded by different weights (training-pass scores) drift apart and would no
    longer group; a later split that reuses the first split's groups still keeps them out."""
    import pytest

    image, similarity = _data()
    _write(tmp_path / "emb", image, similarity)
    first = split(tmp_path / "emb", tmp_path / "first", "fraction:0.8", dedup=0.9999)
    saved = pq.read_table(tmp_path / "first" / "groups.parquet").to_pydict()
    assert sorted(saved["key"]) == [f"{i:06d}" for i in range(21)] and len(set(saved["group"])) == 1
    assert first.manifest.counts["safe"] == 320

    drifted = image.copy()
    drifted[:21] += np.random.default_rng(5).normal(scale=0.05, size=(21, DIM))  # copies no longer near-identical
    drifted /= np.linalg.norm(drifted, axis=1, keepdims=True)
    _write(tmp_path / "emb2", drifted, similarity)

    def copies_safe(part):
        keys = set(pq.read_table(tmp_path / part / "safe" / "00000.parquet").column("key").to_pylist())
        return len(keys & {f"{i:06d}" for i in range(21)})

    fresh = split(tmp_path / "emb2", tmp_path / "fresh", "fraction:0.8", dedup=0.9999).manifest
    assert fresh.extra["dedup"]["groups"] == 0 and copies_safe("fresh") == 21  # found again: nothing groups
    reused = split(tmp_path / "emb2", tmp_path / "reused", "fraction:0.8", dedup=0.9999,
                   dedup_groups=tmp_path / "first").manifest
    assert copies_safe("reused") == 0 and reused.extra["dedup"]["left_safe_set"] == 21
    assert reused.extra["dedup"]["groups_from"].endswith("groups.parquet")
    with pytest.raises(ValueError, match="no groups.parquet"):
        split(tmp_path / "emb2", tmp_path / "x", "fraction:0.8", dedup=0.9999, dedup_groups=tmp_path / "fresh2")
