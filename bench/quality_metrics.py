"""The metric maths of ``bench/quality.py``: numpy/scipy only, no models, no ComfyUI.

Every metric is a function of per-sample values (classifier predictions, feature vectors, pixels),
so the same code scores a real image set, a generator, or a constructed case in the tests:

- :func:`attribute_accuracy`: per attribute and mean, the fraction of images whose attribute the
  classifier reads as the prompt asked (prompt adherence);
- :func:`frechet_distance`: the Frechet distance between two feature sets' Gaussians (FID's formula,
  in the demo classifier's feature space);
- :func:`teacher_fidelity`: the mean feature distance of each image to the teacher's image of the same
  prompt and initial noise;
- :func:`saturated_fraction` and :func:`mean_saturation`: over-exposure measures;
- :func:`bootstrap_ci` and :func:`bootstrap_fd_ci`: seeded percentile-bootstrap 95% intervals.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

#: A pixel counts as saturated when any channel is at most LOW or at least HIGH (uint8 values).
SATURATED_LOW, SATURATED_HIGH = 2, 253


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95% interval ``[lo, hi]``."""
    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


# ------------------------------------------------------------------------------------------------
# per-sample values
# ------------------------------------------------------------------------------------------------

def attribute_hits(preds: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per attribute, a float ``(N,)`` array: 1 where the prediction equals the prompt's label."""
    missing = set(labels) - set(preds)
    if missing:
        raise ValueError(f"predictions lack the attributes {sorted(missing)}")
    hits = {}
    for name, want in labels.items():
        got, want = np.asarray(preds[name]), np.asarray(want)
        if got.shape != want.shape:
            raise ValueError(f"attribute {name!r}: {got.shape} predictions for {want.shape} labels")
        hits[name] = (got == want).astype(np.float64)
    return hits


def mean_hits(hits: dict[str, np.ndarray]) -> np.ndarray:
    """Per sample, the fraction of its attributes that are right: ``(N,)``."""
    return np.mean(np.stack(list(hits.values())), axis=0)


def pair_distances(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance of each feature row to the reference row of the same index: ``(N,)``."""
    a, b = np.asarray(features, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired features must have one shape, got {a.shape} and {b.shape}")
    return np.linalg.norm(a - b, axis=1)


def saturated_per_image(images: np.ndarray) -> np.ndarray:
    """Per uint8 ``(N, H, W, 3)`` image, the fraction of pixels with a channel <= 2 or >= 253."""
    x = np.asarray(images)
    clipped = ((x <= SATURATED_LOW) | (x >= SATURATED_HIGH)).any(axis=-1)
    return clipped.reshape(len(x), -1).mean(axis=1)


def saturation_per_image(images: np.ndarray) -> np.ndarray:
    """Per image, the mean HSV saturation ``(max - min) / max`` of its pixels (0 where max is 0)."""
    x = np.asarray(images, np.float64)
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    sat = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    return sat.reshape(len(x), -1).mean(axis=1)


# ------------------------------------------------------------------------------------------------
# set-level metrics
# ------------------------------------------------------------------------------------------------

def attribute_accuracy(preds: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy per attribute plus ``"mean"`` (the mean over attributes)."""
    hits = attribute_hits(preds, labels)
    out = {name: float(h.mean()) for name, h in hits.items()}
    out["mean"] = float(mean_hits(hits).mean())
    return out


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``(N, D)`` features, N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(S1 S2))`` for covariance matrices, through symmetric eigendecompositions.

    ``S1 S2`` is similar to the symmetric ``R S2 R`` with ``R = S1^(1/2)``, so the trace of its
    square root is the sum of the square roots of that matrix's eigenvalues. Unlike a general
    ``scipy.linalg.sqrtm`` of the non-symmetric product, this needs no eps offset for singular
    covariances (fewer samples than dimensions), has no imaginary rounding to drop, and takes
    milliseconds, which a bootstrap of hundreds of distances needs. Eigenvalues that rounding
    leaves a hair below 0 count as 0."""
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eig = scipy.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` (the trace of the root by
    :func:`trace_sqrt_product`); rounding may leave the result a hair below 0, so it is clipped at 0."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def teacher_fidelity(features: np.ndarray, teacher_features: np.ndarray) -> float:
    """Mean feature distance of each image to the teacher's image of the same prompt and noise."""
    return float(pair_distances(features, teacher_features).mean())


def saturated_fraction(images: np.ndarray) -> float:
    """Fraction of saturated pixels (a channel <= 2 or >= 253) over a uint8 ``(N, H, W, 3)`` set."""
    return float(saturated_per_image(images).mean())


def mean_saturation(images: np.ndarray) -> float:
    """Mean HSV saturation over a uint8 ``(N, H, W, 3)`` set."""
    return float(saturation_per_image(images).mean())


# ------------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------------

def _interval(stats: np.ndarray, value: float, level: float) -> Estimate:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return Estimate(float(value), float(min(lo, value)), float(max(hi, value)))


def bootstrap_ci(per_sample: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """The mean of ``per_sample`` values with a percentile-bootstrap interval (resampling samples).

    The interval is widened to contain the point estimate (a percentile interval of a skewed
    statistic may otherwise miss it by a hair)."""
    x = np.asarray(per_sample, np.float64)
    if x.ndim != 1 or len(x) < 1:
        raise ValueError(f"need a non-empty 1-d array of per-sample values, got shape {x.shape}")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    return _interval(x[idx].mean(axis=1), float(x.mean()), level)


def bootstrap_fd_ci(features_a: np.ndarray, features_b: np.ndarray, n_boot: int = 200, seed: int = 0,
                    level: float = 0.95) -> Estimate:
    """Frechet distance of two sets with a percentile-bootstrap interval resampling both sets."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for k in range(n_boot):
        stats[k] = frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
    return _interval(stats, frechet_distance(a, b), level)
