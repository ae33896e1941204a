"""`safeclip split`: the mixture matches sklearn, the schedule gives the specified ratios,
the ranking is deterministic, outputs are complete and atomic."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.mixture import GaussianMixture
from typer.testing import CliRunner

from cli.main import app
from emb_synth import mixture_similarities, write_emb
from sanitize.defenses.gmm import Mixture
from sanitize.defenses.schedule import parse_schedule, plan_split, round_count
from sanitize.io.artifacts import SplitManifest
from sanitize.stages.split import split


def _emb(tmp_path, sizes=(700, 500, 800), seed=0, **kw):
    rng = np.random.default_rng(seed)
    shards = {f"{i:05d}": mixture_similarities(n, rng) for i, n in enumerate(sizes)}
    return write_emb(tmp_path / "emb", shards, seed=seed, **kw), shards


def _all_rows(part):
    tables = [pq.read_table(p) for sub in ("safe", "risky") for p in sorted((part / sub).glob("*.parquet"))]
    return pa.concat_tables(tables)


# ---- the SPEC grammar --------------------------------------------------------------

def test_parse_schedule_kinds_and_defaults():
    s = parse_schedule("safeclip")
    assert (s.kind, s.threshold, s.step, s.cap, s.r0) == ("safeclip", 0.9, 0.01, 0.85, None)
    s = parse_schedule("safeclip:threshold=0.8, step=0.02,cap=0.7,r0=0.1")
    assert (s.threshold, s.step, s.cap, s.r0) == (0.8, 0.02, 0.7, 0.1)
    assert parse_schedule("fraction:0.3").fraction == 0.3
    assert parse_schedule("threshold:0.95").threshold == 0.95
    assert parse_schedule(" SafeCLIP: ").kind == "safeclip"


@pytest.mark.parametrize("spec, message", [
    ("balanced", "unknown kind"), ("fraction", "needs a value"), ("fraction:1.5", "between"),
    ("threshold:abc", "must be a number"), ("safeclip:foo=1", "expected threshold="),
    ("safeclip:step", "expected threshold="), ("safeclip:cap=0.5,cap=0.6", "twice"),
    ("fraction:nan", "between"),
])
def test_parse_schedule_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec)


def test_plan_follows_safeclip_schedule():
    p = np.linspace(0, 1, 1001)  # 101 values >= 0.9 (0.9 itself included)
    s = parse_schedule("safeclip")
    first = plan_split(s, 0, p)
    assert first.n_safe == int(np.count_nonzero(p >= 0.9)) and first.r0 == pytest.approx(first.n_safe / 1001)
    later = plan_split(s, 5, p, previous_r0=0.2, previous_source="x")
    assert later.ratio == pytest.approx(0.25) and later.n_safe == round_count(0.25, 1001) and later.r0 == 0.2
    capped = plan_split(s, 200, p, previous_r0=0.2)
    assert capped.ratio == 0.85 and capped.n_safe == round_count(0.85, 1001)
    recomputed = plan_split(s, 2, p)  # no previous: r0 from this fit at 0.9
    assert recomputed.r0 == pytest.approx(first.r0) and "this fit" in recomputed.r0_source
    from_spec = plan_split(parse_schedule("safeclip:r0=0.5,step=0.1"), 2, p, previous_r0=0.2)
    assert from_spec.ratio == pytest.approx(0.7) and from_spec.r0_source == "the schedule spec"
    assert plan_split(parse_schedule("fraction:0.3"), 7, p).n_safe == round_count(0.3, 1001) == 300
    assert plan_split(parse_schedule("threshold:0.5"), 0, p).n_safe == 501


# ---- the split itself ---------------------------------------------------------------

def test_split_matches_sklearn_and_writes_schema(tmp_path):
    emb, shards = _emb(tmp_path)
    part = tmp_path / "part"
    m = split(emb, part, "safeclip", seed=3).manifest.to_json()
    sims = np.concatenate(list(shards.values())).astype(np.float64)
    ref = GaussianMixture(n_components=2, random_state=3).fit(sims[:, None])
    order = np.argsort(ref.means_.ravel())
    np.testing.assert_allclose(m["mixture"]["means"], ref.means_.ravel()[order], atol=1e-12)
    np.testing.assert_allclose(m["mixture"]["variances"], ref.covariances_.ravel()[order], atol=1e-12)
    np.testing.assert_allclose(m["mixture"]["weights"], ref.weights_.ravel()[order], atol=1e-12)

    rows = _all_rows(part)
    assert rows.schema.names == ["key", "caption", "url", "similarity", "p_clean", "rank", "partition",
                                 "epoch", "ratio"]
    by_key = dict(zip(rows.column("key").to_pylist(), rows.column("p_clean").to_pylist()))
    keys = [f"{i:05d}{j:04d}" for i, s in enumerate(shards.values()) for j in range(s.size)]
    expected = ref.predict_proba(sims[:, None])[:, order[1]]
    np.testing.assert_allclose([by_key[k] for k in keys], expected, atol=1e-9)

    n_safe = int(np.count_nonzero(expected >= 0.9))
    assert m["counts"] == {"total": 2000, "safe": n_safe, "risky": 2000 - n_safe, "no_similarity": 0,
                           "safe_share": n_safe / 2000}
    assert m["r0"] == pytest.approx(n_safe / 2000)
    assert m["source"] is None and m["input_files"][0] == {"name": "00000.parquet", "rows": 700}
    # One file per embedding file in each partition; rows keep the partition they are in.
    for sub in ("safe", "risky"):
        files = sorted(p.name for p in (part / sub).iterdir())
        assert files == ["00000.parquet", "00001.parquet", "00002.parquet"]  # no temp files left
        t = pa.concat_tables(pq.read_table(part / sub / f) for f in files)
        assert set(t.column("partition").to_pylist()) == {sub}
    safe = pa.concat_tables(pq.read_table(p) for p in sorted((part / "safe").glob("*.parquet")))
    assert min(safe.column("p_clean").to_pylist()) >= 0.9


def test_rank_is_a_deterministic_total_order(tmp_path):
    # Many exact ties: similarities on a coarse grid, keys shuffled across shards.
    rng = np.random.default_rng(1)
    sims = np.round(mixture_similarities(600, rng), 2)
    keys = [f"k{v:04d}" for v in rng.permutation(600)]
    emb = write_emb(tmp_path / "emb", {"a": sims[:300], "b": sims[300:]},
                    keys={"a": keys[:300], "b": keys[300:]})
    split(emb, tmp_path / "p", "fraction:0.4")
    rows = _all_rows(tmp_path / "p").sort_by("rank")
    rank = rows.column("rank").to_numpy()
    np.testing.assert_array_equal(rank, np.arange(600))
    p = rows.column("p_clean").to_numpy()
    s = rows.column("similarity").to_numpy()
    k = rows.column("key").to_pylist()
    assert np.all(np.diff(p) <= 0)
    for i in range(599):  # equal p_clean -> higher similarity first -> smaller key first
        if p[i] == p[i + 1] and s[i] == s[i + 1]:
            assert k[i] < k[i + 1]
    assert np.count_nonzero(s[:-1] == s[1:]) > 100  # the test does exercise ties
    safe = rows.column("partition").to_pylist()
    assert safe == ["safe"] * 240 + ["risky"] * 360
    # Same input, same output, byte for byte.
    split(emb, tmp_path / "q", "fraction:0.4")
    for sub in ("safe", "risky"):
        for f in ("a.parquet", "b.parquet"):
            assert pq.read_table(tmp_path / "p" / sub / f).equals(pq.read_table(tmp_path / "q" / sub / f))


def test_epoch_schedule_with_previous_and_cap(tmp_path):
    emb, _ = _emb(tmp_path)
    m0 = split(emb, tmp_path / "e0", "safeclip").manifest.to_json()
    r0 = m0["r0"]
    m4 = split(emb, tmp_path / "e4", "safeclip:step=0.02", epoch=4, previous=tmp_path / "e0").manifest.to_json()
    assert m4["r0"] == r0 and m4["ratio"] == pytest.approx(min(0.85, r0 + 0.08))
    assert m4["counts"]["safe"] == math.floor(m4["ratio"] * 2000 + 0.5)
    assert "previous split" in m4["r0_source"]
    # r0 carries through later splits, so any earlier split works as --previous.
    m5 = split(emb, tmp_path / "e5", "safeclip:step=0.02", epoch=5, previous=tmp_path / "e4").manifest.to_json()
    assert m5["r0"] == r0
    capped = split(emb, tmp_path / "e90", "safeclip", epoch=90, previous=tmp_path / "e0").manifest.to_json()
    assert capped["ratio"] == 0.85 and capped["counts"]["safe"] == 1700
    rows = _all_rows(tmp_path / "e90")
    assert set(rows.column("epoch").to_pylist()) == {90} and set(rows.column("ratio").to_pylist()) == {0.85}
    no_prev = split(emb, tmp_path / "e2", "safeclip", epoch=2).manifest.to_json()
    assert no_prev["r0"] == pytest.approx(r0) and "this fit" in no_prev["r0_source"]
    frac = split(emb, tmp_path / "f", "fraction:0.3", epoch=3).manifest.to_json()
    assert frac["counts"]["safe"] == 600 and frac["r0"] is None
    with pytest.raises(ValueError, match="no start ratio"):
        split(emb, tmp_path / "bad", "safeclip", epoch=1, previous=tmp_path / "f")


def test_fit_sample_is_seeded(tmp_path):
    emb, _ = _emb(tmp_path, sizes=(1500, 1500))
    a = split(emb, tmp_path / "a", "safeclip", fit_sample=500, seed=7).manifest.to_json()
    b = split(emb, tmp_path / "b", "safeclip", fit_sample=500, seed=7).manifest.to_json()
    c = split(emb, tmp_path / "c", "safeclip", fit_sample=500, seed=8).manifest.to_json()
    assert a["fit_sample"] == a["mixture"]["n_fit"] == 500
    assert a["mixture"] == b["mixture"] and a["mixture"]["means"] != c["mixture"]["means"]
    assert a["counts"]["total"] == 3000  # posteriors for all pairs, not just the sample


def test_missing_similarities_go_to_risky(tmp_path):
    rng = np.random.default_rng(2)
    sims = mixture_similarities(400, rng)
    sims[[3, 50, 399]] = np.nan
    emb = write_emb(tmp_path / "emb", {"00000": sims})
    m = split(emb, tmp_path / "p", "fraction:0.9").manifest.to_json()
    assert m["counts"]["no_similarity"] == 3 and m["warnings"]
    risky = pq.read_table(tmp_path / "p" / "risky" / "00000.parquet")
    bad = {"000000003", "000000050", "000000399"}
    rows = {k: (p, r) for k, p, r in zip(risky.column("key").to_pylist(), risky.column("p_clean").to_pylist(),
                                         risky.column("rank").to_pylist())}
    assert bad <= set(rows) and all(rows[k][0] == 0.0 and rows[k][1] >= 397 for k in bad)
    # Even a schedule that makes everything safe leaves unscored pairs risky.
    m = split(emb, tmp_path / "all", "fraction:1.0").manifest.to_json()
    assert m["counts"]["safe"] == 397 and m["similarity_cutoff"] == pytest.approx(float(np.nanmin(sims)))


def test_refuses_to_overwrite_and_force_replaces(tmp_path):
    emb, _ = _emb(tmp_path)
    part = tmp_path / "p"
    split(emb, part, "fraction:0.5")
    before = (part / "split.json").read_text()
    with pytest.raises(FileExistsError):
        split(emb, part, "fraction:0.2")
    assert (part / "split.json").read_text() == before
    (part / "safe" / "stale.parquet").write_bytes(b"old")
    split(emb, part, "fraction:0.2", force=True)
    assert json.loads((part / "split.json").read_text())["counts"]["safe"] == 400
    assert not (part / "safe" / "stale.parquet").exists()


def test_ignores_dotfiles_and_rejects_bad_input(tmp_path):
    emb, _ = _emb(tmp_path, sizes=(300,))
    (emb / ".00001.parquet.tmp").write_bytes(b"partial")
    assert split(emb, tmp_path / "p", "fraction:0.5").manifest.counts["total"] == 300
    with pytest.raises(FileNotFoundError):
        split(tmp_path / "nowhere", tmp_path / "q", "safeclip")
    pq.write_table(pa.table({"key": ["a"]}), emb / "00009.parquet")
    with pytest.raises(ValueError, match="missing column"):
        split(emb, tmp_path / "r", "safeclip")


def test_works_without_url_column(tmp_path):
    emb, _ = _emb(tmp_path, sizes=(200,), with_url=False)
    split(emb, tmp_path / "p", "fraction:0.5")
    rows = _all_rows(tmp_path / "p")
    assert rows.column("url").null_count == 200


# ---- the CLI ------------------------------------------------------------------------

def test_cli_split_and_errors(tmp_path):
    emb, _ = _emb(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["split", str(emb), "--out", str(tmp_path / "p"), "--ratio-schedule",
                            "safeclip:threshold=0.8", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "2,000 pairs" in r.output and "safe" in r.output
    m = json.loads((tmp_path / "p" / "split.json").read_text())
    assert m["seed"] == 1 and m["schedule"]["threshold"] == 0.8
    for args in (["--ratio-schedule", "fraction:2"], ["--ratio-schedule", "nope"]):
        r = runner.invoke(app, ["split", str(emb), "--out", str(tmp_path / "q"), *args])
        assert r.exit_code != 0 and "Traceback" not in r.output and "error" in r.output
    r = runner.invoke(app, ["split", str(emb), "--out", str(tmp_path / "p")])
    assert r.exit_code != 0 and "--force" in r.output
    r = runner.invoke(app, ["split", "--help"])
    assert "fraction:F" in r.output and "threshold:T" in r.output


def test_split_records_separation_and_warns_when_not_to_trust_it(tmp_path):
    from sanitize.defenses.gmm import separation

    rng = np.random.default_rng(0)
    good = write_emb(tmp_path / "good", {"00000": mixture_similarities(2000, rng)})
    r = split(good, tmp_path / "pg", "safeclip")
    m = json.loads((tmp_path / "pg" / "split.json").read_text())
    expected = separation(Mixture(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["mixture"].items()
                                     if k != "monotone_below"}))
    assert m["separation"] == pytest.approx(expected) and m["separation"]["separated"]
    assert SplitManifest.from_json(m).separation == m["separation"]
    assert not [w for w in r.warnings if "floor" in w or "overlap" in w]
    # Two bumps at 0.10 and 0.15 with overlapping spreads (the demo of issue 15), and a tiny safe set.
    sims = np.where(rng.random(2000) < 0.5, rng.normal(0.10, 0.04, 2000), rng.normal(0.15, 0.05, 2000))
    poor = write_emb(tmp_path / "poor", {"00000": sims.astype(np.float32)})
    r = split(poor, tmp_path / "pp", "fraction:0.05")
    assert any("below the 10% floor" in w for w in r.warnings)
    assert any("components overlap (" in w and "wrong side" in w for w in r.warnings)
    assert r.manifest.warnings == r.warnings and not r.manifest.separation["separated"]
    out = CliRunner().invoke(app, ["split", str(poor), "--out", str(tmp_path / "pc"), "-r", "fraction:0.05"])
    assert out.exit_code == 0 and "floor" in out.output and "Ashman's D" in out.output
