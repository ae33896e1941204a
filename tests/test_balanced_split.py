"""Balanced split (issue 6 item 4): the schedule's safe count is shared out over k-means
clusters of the embeddings, each filled by its own best p_clean."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import sanitize.defenses.balance as balance
from cli.main import app
from emb_synth import mixture_similarities, write_emb, write_embed_manifest
from sanitize.defenses.balance import BalanceOptions, balanced_order, cluster_quotas, vectors_to_numpy
from sanitize.defenses.schedule import round_count
from sanitize.stages.split import split

GROUPS = 4
# Clean-pair similarity per group: group 0 is the "easy" concept, group 3 the "hard" one.
CLEAN_MEAN = (0.42, 0.32, 0.30, 0.22)


def _clustered_emb(path, sizes=(900, 700), dim=16, seed=0, nan_rows=()):
    """Embedding files where the pairs fall in GROUPS obvious directions (image and text
    near the same centre) and the clean similarities are skewed towards group 0.
    The `similarity` column is drawn per group rather than computed from the vectors:
    the split reads only that column for p_clean and only the vectors for clustering."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, GROUPS)))[0].T  # orthonormal: far apart
    path.mkdir(parents=True)
    truth = {}
    for index, n in enumerate(sizes):
        group = rng.integers(0, GROUPS, n)
        clean = rng.random(n) < 0.8
        sims = np.where(clean, rng.normal(np.take(CLEAN_MEAN, group), 0.03), rng.normal(0.05, 0.04, n))
        sims = sims.astype(np.float32)
        if index == 0:
            sims[list(nan_rows)] = np.nan

        def near(c):
            v = centres[c] + 0.15 * rng.normal(size=(n, dim))
            return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)

        keys = [f"{index:05d}{i:04d}" for i in range(n)]
        truth.update(zip(keys, group.tolist()))
        image, text = near(group), near(group)
        table = pa.table({
            "key": keys,
            "caption": [f"item {k}" for k in keys],
            "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1), pa.float16()), dim),
            "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1), pa.float16()), dim),
            "similarity": pa.array(sims, pa.float32()),
        })
        pq.write_table(table, path / f"{index:05d}.parquet")
    write_embed_manifest(path)
    return path, truth


def _rows(part):
    return pa.concat_tables(pq.read_table(p) for sub in ("safe", "risky")
                            for p in sorted((part / sub).glob("*.parquet")))


def _safe_by_group(part, truth):
    rows = _rows(part)
    safe = np.zeros(GROUPS, int)
    size = np.zeros(GROUPS, int)
    for key, partition in zip(rows.column("key").to_pylist(), rows.column("partition").to_pylist()):
        size[truth[key]] += 1
        safe[truth[key]] += partition == "safe"
    return safe, size


# ---- the pure core --------------------------------------------------------------

def test_quotas_sum_exactly_and_stay_within_one_of_the_share():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, rng.integers(1, 12))
        n_safe = int(rng.integers(0, sizes.sum() + 1))
        quota = cluster_quotas(sizes, n_safe)
        assert quota.sum() == n_safe
        exact = sizes * n_safe / max(sizes.sum(), 1)
        assert np.all((quota == np.floor(exact)) | (quota == np.ceil(exact)))
        assert np.all(quota <= sizes)
    # Equal remainders go to the lower cluster id, so the result is deterministic.
    np.testing.assert_array_equal(cluster_quotas([3, 3, 3], 4), [2, 1, 1])
    np.testing.assert_array_equal(cluster_quotas([10, 0, 30], 20), [5, 0, 15])
    with pytest.raises(ValueError):
        cluster_quotas([2, 2], 5)


def test_balanced_order_puts_each_clusters_best_first():
    # 8 rows in global order 0..7; clusters alternate, row 7 is not clustered (-1).
    labels = np.array([0, 0, 0, 0, 1, 1, 1, -1])
    global_order = np.arange(8)
    order, quota = balanced_order(global_order, labels, 2, 4)
    np.testing.assert_array_equal(quota, [2, 2])  # 4 of 7 clustered: 4*4/7 -> 2, 4*3/7 -> 2
    np.testing.assert_array_equal(order, [0, 1, 4, 5, 2, 3, 6, 7])
    # The global cut would have taken rows 0-3, all from cluster 0.
    shuffled = np.array([6, 2, 0, 7, 4, 1, 5, 3])
    order, quota = balanced_order(shuffled, labels, 2, 3)
    np.testing.assert_array_equal(quota, [2, 1])  # 12/7 and 9/7: the larger remainder gets the extra one
    # Cluster 0's best two in global order are 2 and 0, cluster 1's best is 6; each part
    # keeps the global order, and the unclustered row 7 is never safe.
    np.testing.assert_array_equal(order, [6, 2, 0, 7, 4, 1, 5, 3])


def test_vectors_to_numpy_handles_slices_nulls_and_plain_lists():
    flat = pa.array(np.arange(12, dtype=np.float16), pa.float16())
    fixed = pa.FixedSizeListArray.from_arrays(flat, 3)
    np.testing.assert_array_equal(vectors_to_numpy(fixed.slice(1, 2), "x"), [[3, 4, 5], [6, 7, 8]])
    with_null = pa.FixedSizeListArray.from_arrays(flat, 3, mask=pa.array([False, True, False, False]))
    np.testing.assert_array_equal(vectors_to_numpy(with_null, "x")[1], [0, 0, 0])
    plain = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))
    np.testing.assert_array_equal(vectors_to_numpy(plain, "x"), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="same length"):
        vectors_to_numpy(pa.array([[1.0], [2.0, 3.0]]), "x")


def test_options_are_validated():
    assert BalanceOptions.from_mapping(None) == BalanceOptions()
    for bad, message in (({"clusters": 0}, "--clusters"), ({"cluster_on": "caption"}, "--cluster-on"),
                         ({"clusters": 5, "sample": 4}, "--cluster-sample"), ({"k": 3}, "unknown")):
        with pytest.raises(ValueError, match=message):
            BalanceOptions.from_mapping(bad)


# ---- the split --------------------------------------------------------------------

def test_global_starves_the_hard_cluster_balanced_does_not(tmp_path):
    emb, truth = _clustered_emb(tmp_path / "emb")
    g = split(emb, tmp_path / "g", "fraction:0.3").manifest.to_json()
    b = split(emb, tmp_path / "b", "fraction:0.3", ranking="balanced",
              ranking_options={"clusters": GROUPS}).manifest.to_json()
    n = len(truth)
    assert g["counts"]["safe"] == b["counts"]["safe"] == round_count(0.3, n)
    g_safe, size = _safe_by_group(tmp_path / "g", truth)
    b_safe, _ = _safe_by_group(tmp_path / "b", truth)
    assert g_safe[3] < 0.03 * size[3] and g_safe[0] > 0.6 * size[0]   # the global cut starves group 3
    r = b["counts"]["safe"] / n
    assert np.all(np.abs(b_safe - r * size) <= 1), (b_safe, r * size)  # clusters found = groups
    info = b["balance"]
    assert b["ranking"] == "balanced" and "balance" not in g and g["ranking"] == "global"
    assert (info["clusters"], info["cluster_on"], info["sample"], info["seed"]) == (GROUPS, "joint", n, 0)
    assert sorted(info["cluster_sizes"]) == sorted(size.tolist())
    assert sum(info["cluster_safe"]) == b["counts"]["safe"] == sum(info["cluster_safe_global"])
    assert sorted(info["cluster_safe_global"]) == sorted(g_safe.tolist())
    assert info["safe_also_in_global_cut"] < b["counts"]["safe"]

    # The output rank is a total order: the first n_safe ranks are the safe set, and
    # inside each part p_clean never increases (the global order is kept there).
    rows = _rows(tmp_path / "b").sort_by("rank")
    np.testing.assert_array_equal(rows.column("rank").to_numpy(), np.arange(n))
    n_safe = b["counts"]["safe"]
    assert rows.column("partition").to_pylist() == ["safe"] * n_safe + ["risky"] * (n - n_safe)
    p = rows.column("p_clean").to_numpy()
    assert np.all(np.diff(p[:n_safe]) <= 0) and np.all(np.diff(p[n_safe:]) <= 0)
    # Each cluster's safe rows are its best: no risky row of a group beats a safe one.
    groups = np.array([truth[k] for k in rows.column("key").to_pylist()])
    for c in range(GROUPS):
        mine = groups == c
        assert p[:n_safe][mine[:n_safe]].min() >= p[n_safe:][mine[n_safe:]].max()


def test_epoch0_count_is_the_global_threshold_count(tmp_path):
    emb, truth = _clustered_emb(tmp_path / "emb")
    g = split(emb, tmp_path / "g", "safeclip").manifest.to_json()
    b = split(emb, tmp_path / "b", "safeclip", ranking="balanced", ranking_options={"clusters": GROUPS}).manifest.to_json()
    assert b["counts"]["safe"] == g["counts"]["safe"] > 0 and b["r0"] == g["r0"]
    # Later epochs: same r0 carried along, same count as the global schedule.
    g3 = split(emb, tmp_path / "g3", "safeclip", epoch=3, previous=tmp_path / "g").manifest.to_json()
    b3 = split(emb, tmp_path / "b3", "safeclip", epoch=3, previous=tmp_path / "b", ranking="balanced",
               ranking_options={"clusters": GROUPS}).manifest.to_json()
    assert b3["counts"]["safe"] == g3["counts"]["safe"] and b3["ratio"] == g3["ratio"]


def test_deterministic_and_streamed_in_batches(tmp_path, monkeypatch):
    emb, truth = _clustered_emb(tmp_path / "emb", sizes=(500, 400, 300))
    opts = {"clusters": GROUPS, "sample": 600}
    a = split(emb, tmp_path / "a", "fraction:0.4", ranking="balanced", ranking_options=opts, seed=5).manifest.to_json()
    monkeypatch.setattr(balance, "BATCH_ROWS", 97)  # many batches per file, sampled rows across them
    b = split(emb, tmp_path / "b", "fraction:0.4", ranking="balanced", ranking_options=opts, seed=5).manifest.to_json()
    assert a["balance"]["sample"] == 600 and a["balance"] == b["balance"]
    for sub in ("safe", "risky"):
        for f in ("00000.parquet", "00001.parquet", "00002.parquet"):
            assert pq.read_table(tmp_path / "a" / sub / f).equals(pq.read_table(tmp_path / "b" / sub / f))
    safe, size = _safe_by_group(tmp_path / "b", truth)
    assert np.all(np.abs(safe - 0.4 * size) <= 1)
    # Image-only clusters find the same groups here.
    split(emb, tmp_path / "i", "fraction:0.4", ranking="balanced",
          ranking_options={"clusters": GROUPS, "cluster_on": "image"})
    safe, size = _safe_by_group(tmp_path / "i", truth)
    assert np.all(np.abs(safe - 0.4 * size) <= 1)


def test_pairs_without_similarity_stay_risky_and_unclustered(tmp_path):
    emb, truth = _clustered_emb(tmp_path / "emb", nan_rows=(0, 5, 9))
    m = split(emb, tmp_path / "p", "fraction:1.0", ranking="balanced",
              ranking_options={"clusters": GROUPS}).manifest.to_json()
    n = len(truth)
    assert m["counts"]["safe"] == n - 3 and sum(m["balance"]["cluster_sizes"]) == n - 3
    risky = pq.read_table(tmp_path / "p" / "risky" / "00000.parquet").column("key").to_pylist()
    assert sorted(risky) == ["000000000", "000000005", "000000009"]


def test_bad_input_is_a_clear_error(tmp_path):
    emb = write_emb(tmp_path / "emb", {"00000": mixture_similarities(50, np.random.default_rng(0))})
    with pytest.raises(ValueError, match="more than the 50 pairs"):
        split(emb, tmp_path / "a", "fraction:0.5", ranking="balanced", ranking_options={"clusters": 60,
                                                                                           "sample": 60})
    with pytest.raises(ValueError, match="unknown ranking"):
        split(emb, tmp_path / "b", "fraction:0.5", ranking="clustered")
    assert not (tmp_path / "b").exists()
    table = pq.read_table(emb / "00000.parquet").drop_columns(["image_emb"])
    pq.write_table(table, emb / "00000.parquet")
    with pytest.raises(ValueError, match="no image_emb column"):
        split(emb, tmp_path / "c", "fraction:0.5", ranking="balanced")
    # text-only clustering does not need the image column
    m = split(emb, tmp_path / "d", "fraction:0.5", ranking="balanced",
              ranking_options={"clusters": 2, "cluster_on": "text"}).manifest.to_json()
    assert m["counts"]["safe"] == 25 and any("fewer than 39" in w for w in m["warnings"])
    # options for the global ranking are reported as ignored, not silently dropped
    m = split(emb, tmp_path / "e", "fraction:0.5", ranking_options={"clusters": 3}).manifest.to_json()
    assert any("not used by the global ranking" in w for w in m["warnings"])


# ---- the CLI ------------------------------------------------------------------------

def test_cli_balanced(tmp_path):
    emb, truth = _clustered_emb(tmp_path / "emb", sizes=(600,))
    runner = CliRunner()
    r = runner.invoke(app, ["split", str(emb), "--out", str(tmp_path / "p"), "--ratio-schedule", "fraction:0.25",
                            "--ranking", "balanced", "--clusters", str(GROUPS), "--cluster-on", "joint",
                            "--cluster-sample", "400", "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert "balanced over 4 joint clusters" in r.output and "150 safe" in r.output
    m = json.loads((tmp_path / "p" / "split.json").read_text())
    assert m["balance"]["sample"] == 400 and m["balance"]["seed"] == 2
    for args in (["--ranking", "nope"], ["--ranking", "balanced", "--cluster-on", "caption"],
                 ["--ranking", "balanced", "--clusters", "0"]):
        r = runner.invoke(app, ["split", str(emb), "--out", str(tmp_path / "q"), *args])
        assert r.exit_code != 0 and "Traceback" not in r.output and "error" in r.output, (args, r.output)
    r = runner.invoke(app, ["split", "--help"])
    assert "--ranking" in r.output and "--cluster-on" in r.output
