"""The mixture fit and posteriors against scikit-learn's GaussianMixture (the reference)."""

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from sanitize.defenses.gmm import clean_posterior, density, fit_mixture


def _bimodal(n: int, seed: int, wide_clean: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clean = rng.random(n) < 0.7
    return np.where(clean, rng.normal(0.3, 0.12 if wide_clean else 0.05, n), rng.normal(0.05, 0.03, n))


@pytest.mark.parametrize("seed", [0, 3])
def test_fit_and_posterior_match_sklearn(seed):
    x = _bimodal(5000, seed)
    ours = fit_mixture(x, seed=seed)
    ref = GaussianMixture(n_components=2, random_state=seed).fit(x[:, None])
    order = np.argsort(ref.means_.ravel())
    np.testing.assert_allclose(ours.means, ref.means_.ravel()[order], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.variances, ref.covariances_.ravel()[order], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.weights, ref.weights_.ravel()[order], rtol=0, atol=1e-12)
    assert ours.means[0] < ours.means[1]
    # Posteriors on points the fit did not see, including far tails.
    probe = np.concatenate([_bimodal(2000, seed + 100), [-1.0, -0.5, 0.0, 0.9, 1.0]])
    expected = ref.predict_proba(probe[:, None])[:, order[1]]
    np.testing.assert_allclose(clean_posterior(probe, ours), expected, rtol=0, atol=1e-9)


def test_fit_recovers_known_components():
    x = _bimodal(20000, 1)
    m = fit_mixture(x, seed=0)
    assert m.means == pytest.approx((0.05, 0.3), abs=0.01)
    assert np.sqrt(m.variances) == pytest.approx((0.03, 0.05), abs=0.01)
    assert m.weights == pytest.approx((0.3, 0.7), abs=0.02)
    assert m.converged and m.n_fit == 20000


def test_posterior_is_stable_in_the_tails_and_chunked():
    m = fit_mixture(_bimodal(3000, 2), seed=0)
    x = np.linspace(-1, 1, 10001)
    p = clean_posterior(x, m)
    assert np.all(np.isfinite(p)) and p.min() >= 0 and p.max() <= 1
    from sanitize.defenses.gmm import clean_log_odds
    np.testing.assert_array_equal(clean_log_odds(x, m, chunk=7), clean_log_odds(x, m))


def test_monotone_below_reports_where_p_clean_turns():
    m = fit_mixture(_bimodal(20000, 4, wide_clean=True), seed=0)
    turn = m.monotone_below
    assert turn is not None and turn < m.means[0]
    p = clean_posterior(np.array([turn - 0.2, turn, m.means[0]]), m)
    assert p[0] > p[1] and p[2] > p[1]  # p_clean rises again below the turning point


def test_density_integrates_to_the_weight():
    m = fit_mixture(_bimodal(3000, 5), seed=0)
    x = np.linspace(-1, 1.5, 20001)
    for c in (0, 1):
        assert np.trapezoid(density(x, m, c), x) == pytest.approx(m.weights[c], rel=1e-4)


def test_rejects_degenerate_input():
    with pytest.raises(ValueError, match="distinct"):
        fit_mixture(np.full(10, 0.2))
    with pytest.raises(ValueError, match="finite"):
        fit_mixture(np.array([0.1, np.nan, 0.3]))
