"""A two-component 1-D Gaussian mixture over pair similarities (SafeCLIP's split).

The fit is scikit-learn's `GaussianMixture` (the reference, as in SafeCLIP's own
code). Posteriors for every pair are computed here in numpy, in chunks, from the
fitted parameters: the same formula sklearn's `predict_proba` uses, but without
building an (N, 2) matrix for 10 million pairs, and as log-odds as well, so that
pairs whose `p_clean` rounds to exactly 1.0 can still be ordered.

Caveat (inherent to the method): when the clean component is wider than the risky
one, the posterior of the clean component rises again far below the risky mean.
We follow the reference and do not patch that; `Mixture.monotone_below` says
where it starts so callers can report it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# sklearn's default regularisation, kept explicit because it enters the variances.
REG_COVAR = 1e-6


@dataclass(frozen=True)
class Mixture:
    """Fitted parameters, component 0 = low mean ("risky"), 1 = high mean ("clean")."""

    means: tuple[float, float]
    variances: tuple[float, float]
    weights: tuple[float, float]
    converged: bool
    n_iter: int
    n_fit: int

    def as_dict(self) -> dict:
        out = asdict(self)
        out["means"], out["variances"], out["weights"] = (list(self.means), list(self.variances),
                                                          list(self.weights))
        out["monotone_below"] = self.monotone_below
        return out

    @property
    def monotone_below(self) -> float | None:
        """Similarity below which p_clean stops decreasing (None: monotone everywhere).

        The log-odds is quadratic in x; with unequal variances it has one extremum.
        Only a minimum (clean component wider) matters, and only left of the means.
        """
        (m0, m1), (v0, v1) = self.means, self.variances
        a = 0.5 * (1.0 / v0 - 1.0 / v1)  # coefficient of x^2 in the log-odds
        if a <= 0:
            return None
        b = m1 / v1 - m0 / v0
        return float(-b / (2 * a))


def fit_mixture(x: np.ndarray, seed: int = 0, max_iter: int = 100, tol: float = 1e-3) -> Mixture:
    """Fit two components to the 1-D values `x` with scikit-learn (k-means init, seeded)."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError("similarities must be finite to fit the mixture")
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"need at least 2 distinct similarities to fit a 2-component mixture (got {x.size} pairs)")
    gmm = GaussianMixture(n_components=2, covariance_type="full", reg_covar=REG_COVAR, max_iter=max_iter,
                          tol=tol, random_state=seed)
    gmm.fit(x[:, None])
    means = gmm.means_.reshape(-1)
    variances = gmm.covariances_.reshape(-1)
    weights = gmm.weights_.reshape(-1)
    order = np.argsort(means, kind="stable")  # low mean first: component 1 is "clean"
    return Mixture(means=(float(means[order[0]]), float(means[order[1]])),
                   variances=(float(variances[order[0]]), float(variances[order[1]])),
                   weights=(float(weights[order[0]]), float(weights[order[1]])),
                   converged=bool(gmm.converged_), n_iter=int(gmm.n_iter_), n_fit=int(x.size))


def _log_weighted_density(x: np.ndarray, mean: float, var: float, weight: float) -> np.ndarray:
    return math.log(weight) - 0.5 * (math.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def clean_log_odds(x: np.ndarray, mixture: Mixture, chunk: int = 1 << 20) -> np.ndarray:
    """log p(clean | x) - log p(risky | x) for every x, float64, computed in chunks."""
    x = np.asarray(x).reshape(-1)
    out = np.empty(x.size, dtype=np.float64)
    (m0, m1), (v0, v1), (w0, w1) = mixture.means, mixture.variances, mixture.weights
    for start in range(0, x.size, chunk):
        part = x[start:start + chunk].astype(np.float64)
        out[start:start + chunk] = (_log_weighted_density(part, m1, v1, w1)
                                    - _log_weighted_density(part, m0, v0, w0))
    return out


def posterior_from_log_odds(log_odds: np.ndarray) -> np.ndarray:
    """The logistic function, written so neither tail overflows."""
    out = np.empty_like(log_odds, dtype=np.float64)
    pos = log_odds >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-log_odds[pos]))
    e = np.exp(log_odds[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def clean_posterior(x: np.ndarray, mixture: Mixture) -> np.ndarray:
    """p_clean: posterior probability of the high-mean component, for every x."""
    return posterior_from_log_odds(clean_log_odds(x, mixture))


def density(x: np.ndarray, mixture: Mixture, component: int) -> np.ndarray:
    """Weighted density of one component (for plotting the fit over a histogram)."""
    mean, var, weight = mixture.means[component], mixture.variances[component], mixture.weights[component]
    return np.exp(_log_weighted_density(np.asarray(x, dtype=np.float64), mean, var, weight))


# ---- how well the two components separate ----------------------------------------------------

# When the components overlap too much to trust p_clean: the fit itself expects at least this
# share of pairs on the wrong side (`bayes_overlap`), or the two component densities are nearly
# the same whatever their weights (Bhattacharyya coefficient at least MAX_BHATTACHARYYA).
# Measured on 14 first splits of the demo's 5,150 pairs (docs/pipeline.md, "safeclip demo"):
# the warm-ups whose split worked (AUROC of p_clean >= 0.9) fitted overlaps of 3.5-9.8% and
# coefficients of 0.54-0.74; those that failed (AUROC 0.49-0.80) 12-39% and 0.71-0.94. Ashman's D
# (> 2 is the textbook criterion) is reported but tells them apart worse: 1.1-1.7 vs 0.1-1.6.
MAX_OVERLAP = 0.10
MAX_BHATTACHARYYA = 0.8
# A safe share below this is too small to train the CLIP loss on. Measured: the 20k-pair proxy of
# issue 17 started at 2.9% and reached 7.9% by epoch 8, and its defended model ended at 23.2%
# zero-shot against 84.2% undefended; every run here that kept its accuracy trained on >= 20%.
MIN_SAFE_SHARE = 0.10


def _normal_cdf(x: float, mean: float, var: float) -> float:
    if x == math.inf:
        return 1.0
    if x == -math.inf:
        return 0.0
    return 0.5 * (1.0 + math.erf((x - mean) / math.sqrt(2.0 * var)))


def _log_odds_quadratic(mixture: Mixture) -> tuple[float, float, float]:
    """(a, b, c) with clean_log_odds(x) = a·x² + b·x + c."""
    (m0, m1), (v0, v1), (w0, w1) = mixture.means, mixture.variances, mixture.weights
    a = 0.5 * (1.0 / v0 - 1.0 / v1)
    b = m1 / v1 - m0 / v0
    c = math.log(w1 / w0) - 0.5 * math.log(v1 / v0) - 0.5 * (m1 * m1 / v1 - m0 * m0 / v0)
    if abs(a) < 1e-12 * max(1.0 / v0, 1.0 / v1):
        a = 0.0
    return a, b, c


def bayes_overlap(mixture: Mixture) -> float:
    """∫ min(w0·f0, w1·f1) dx: the share of pairs the fitted mixture itself expects to assign to
    the wrong component (its Bayes error). 0 = disjoint components, at most min(w0, w1)."""
    (m0, m1), (v0, v1), (w0, w1) = mixture.means, mixture.variances, mixture.weights
    a, b, c = _log_odds_quadratic(mixture)
    if a:
        disc = b * b - 4 * a * c
        roots = sorted({(-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)}) if disc >= 0 else []
    else:
        roots = [-c / b] if b else []
    edges = [-math.inf, *roots, math.inf]

    def clean_wins(lo: float, hi: float) -> bool:  # the sign of the log-odds inside (lo, hi)
        if math.isfinite(lo) and math.isfinite(hi):
            x = (lo + hi) / 2
            return a * x * x + b * x + c > 0
        if a:
            return a > 0  # a quadratic's sign far out on either side
        if b:
            return (b > 0) == math.isinf(hi)
        return c > 0

    total = 0.0
    for lo, hi in zip(edges, edges[1:]):
        mean, var, weight = (m0, v0, w0) if clean_wins(lo, hi) else (m1, v1, w1)  # the smaller one there
        total += weight * (_normal_cdf(hi, mean, var) - _normal_cdf(lo, mean, var))
    return float(total)


def separation(mixture: Mixture) -> dict:
    """How well the fit separates risky from clean: a pure function of the fitted parameters.

    ashman_d       sqrt(2)·|m1 - m0| / sqrt(v0 + v1) (> 2: separated, by the textbook rule).
    bhattacharyya  the Bhattacharyya coefficient of the two component densities (weights left
                   out): 1 = identical, 0 = disjoint; `bhattacharyya_distance` = -ln of it.
    overlap        the fitted mixture's Bayes error (`bayes_overlap`).
    clean_weight   the high-mean component's weight: the share of pairs the fit calls clean.
    separated      overlap < MAX_OVERLAP and bhattacharyya < MAX_BHATTACHARYYA (measured, see there).
    """
    (m0, m1), (v0, v1), (_w0, w1) = mixture.means, mixture.variances, mixture.weights
    d = math.sqrt(2.0) * abs(m1 - m0) / math.sqrt(v0 + v1)
    distance = (m1 - m0) ** 2 / (4.0 * (v0 + v1)) + 0.5 * math.log((v0 + v1) / (2.0 * math.sqrt(v0 * v1)))
    coefficient, overlap = math.exp(-distance), bayes_overlap(mixture)
    return {"ashman_d": d, "bhattacharyya": coefficient, "bhattacharyya_distance": distance,
            "overlap": overlap, "clean_weight": float(w1),
            "separated": overlap < MAX_OVERLAP and coefficient < MAX_BHATTACHARYYA}


def split_warnings(quality: dict, safe_share: float | None, min_safe_share: float = MIN_SAFE_SHARE) -> list[str]:
    """Plain-language warnings when a split should not be trusted (see `separation`);
    `safe_share` None skips the floor (the caller has said so already)."""
    out = []
    if safe_share is not None and safe_share < min_safe_share:
        out.append(f"the safe set holds {safe_share:.1%} of the pairs, below the {min_safe_share:.0%} floor a "
                   f"CLIP loss can train well on (a longer or stronger warm-up, or a fraction:F schedule, "
                   f"gives more; docs/split.md)")
    if not quality["separated"]:
        out.append(f"the mixture's components overlap ({quality['overlap']:.1%} of pairs on the wrong side by "
                   f"the fit's own account, limit {MAX_OVERLAP:.0%}; Bhattacharyya coefficient "
                   f"{quality['bhattacharyya']:.2f}, limit {MAX_BHATTACHARYYA:g}; Ashman's D "
                   f"{quality['ashman_d']:.2f}): p_clean does not tell clean from risky well; the warm-up may be "
                   f"too weak")
    return out
