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
