"""The metric code of bench/quality.py on constructed cases (no server, no generator).

Two layers: the pure maths (bench/quality_metrics.py) on arrays whose answer is known, and the
instrument chain (demo/classifier.py reading demo/dataset.py images, then the metrics) on a perfect
generator (real images for the prompts), a wrong-colour generator (the same scenes rendered in
another colour) and a wrong-image generator (real images of other prompts). No test asserts how
good a trained model is.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import quality_metrics as qm  # noqa: E402

# ------------------------------------------------------------------------------------------------
# pure maths
# ------------------------------------------------------------------------------------------------


def test_accuracy_counts_matching_attributes():
    labels = {"shape": np.array([0, 1, 2, 3]), "colour": np.array([0, 1, 2, 3])}
    preds = {"shape": np.array([0, 1, 2, 3]), "colour": np.array([1, 1, 0, 0])}
    acc = qm.attribute_accuracy(preds, labels)
    assert acc == {"shape": 1.0, "colour": 0.25, "mean": 0.625}


def test_accuracy_refuses_mismatched_predictions():
    with pytest.raises(ValueError, match="colour"):
        qm.attribute_accuracy({"shape": np.zeros(3)}, {"shape": np.zeros(3), "colour": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        qm.attribute_accuracy({"shape": np.zeros(2)}, {"shape": np.zeros(3)})


def test_frechet_of_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(300, 16))
    assert qm.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_of_a_shifted_set_is_the_squared_shift():
    """Equal covariances: the trace term vanishes and FD is |shift|^2 exactly."""
    f = np.random.default_rng(1).normal(size=(500, 8))
    shift = np.arange(8) * 0.25
    assert qm.frechet_distance(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_matches_the_closed_form_for_diagonal_gaussians():
    """Diagonal covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (s1 - s2)^2 over standard deviations."""
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 3.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -1.0])
    want = float((mu1 - mu2) @ (mu1 - mu2) + ((s1 - s2) ** 2).sum())
    assert qm.frechet_from_stats(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(want, rel=1e-9)


def test_frechet_survives_singular_covariances():
    """Fewer samples than dimensions (rank-deficient covariances): finite, non-negative, near 0 for a copy."""
    f = np.random.default_rng(2).normal(size=(10, 64))
    g = np.random.default_rng(3).normal(size=(10, 64)) + 1.0
    assert qm.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-3)
    assert np.isfinite(qm.frechet_distance(f, g)) and qm.frechet_distance(f, g) > 10.0


def test_teacher_fidelity_is_the_mean_paired_distance():
    t = np.zeros((4, 2))
    s = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert qm.teacher_fidelity(t, t) == 0.0
    assert qm.teacher_fidelity(s, t) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="shape"):
        qm.teacher_fidelity(s, t[:3])


def test_overexposure_measures():
    white = np.full((1, 4, 4, 3), 255, np.uint8)
    grey = np.full((1, 4, 4, 3), 128, np.uint8)
    red = np.zeros((1, 4, 4, 3), np.uint8)
    red[..., 0] = 200
    half = grey.copy()
    half[:, :2] = 0
    assert qm.saturated_fraction(white) == 1.0 and qm.saturated_fraction(grey) == 0.0
    assert qm.saturated_fraction(half) == 0.5
    assert qm.saturated_fraction(red) == 1.0  # green and blue at 0
    assert qm.mean_saturation(grey) == 0.0 and qm.mean_saturation(red) == 1.0
    assert qm.mean_saturation(np.zeros((1, 2, 2, 3), np.uint8)) == 0.0  # black: no division by 0


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(4)
    small = qm.bootstrap_ci(rng.random(50) < 0.7, seed=0)
    large = qm.bootstrap_ci(rng.random(2000) < 0.7, seed=0)
    for est in (small, large):
        assert est.lo <= est.value <= est.hi and est.lo < est.hi
    assert (large.hi - large.lo) < 0.5 * (small.hi - small.lo)
    with pytest.raises(ValueError):
        qm.bootstrap_ci(np.array([]))
    with pytest.raises(ValueError):
        qm.bootstrap_ci(np.array(0.5))


def test_bootstrap_is_seeded():
    x = np.random.default_rng(5).random(100)
    assert qm.bootstrap_ci(x, seed=3) == qm.bootstrap_ci(x, seed=3)
    assert qm.bootstrap_ci(x, seed=3) != qm.bootstrap_ci(x, seed=4)


def test_fd_bootstrap_resamples_both_sets():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 0.5
    est = qm.bootstrap_fd_ci(a, b, n_boot=100, seed=0)
    assert est.value == pytest.approx(qm.frechet_distance(a, b))
    assert est.lo <= est.value <= est.hi and est.hi - est.lo > 0.0
    assert qm.bootstrap_fd_ci(a, b, n_boot=100, seed=0) == est


# ------------------------------------------------------------------------------------------------
# the instrument chain: classifier + metrics on constructed generators
# ------------------------------------------------------------------------------------------------

N = 256


@pytest.fixture(scope="module")
def instrument():
    sys.path.insert(0, str(REPO))
    from demo import classifier, dataset

    return classifier, dataset, classifier.load()


def _real(dataset, seed: int, n: int = N):
    """``n`` real dataset items from ``seed``: (uint8 images, scenes)."""
    items = [dataset.sample(seed, i) for i in range(n)]
    return np.stack([img for img, _, _ in items]), [scene for _, _, scene in items]


def _rerendered(dataset, scenes, seed: int, **change) -> np.ndarray:
    """The scenes rendered again with some attributes changed (``colour=callable`` maps the old colour)."""
    out = []
    for i, s in enumerate(scenes):
        values = {k: v(getattr(s, k)) if callable(v) else v for k, v in change.items()}
        out.append(dataset.render(dataclasses.replace(s, **values), np.random.default_rng([seed, i])))
    return np.stack(out)


def _recoloured(dataset, scenes, seed: int) -> np.ndarray:
    """Each scene rendered in the next colour of the palette (shape, pattern, position kept)."""
    colours = list(dataset.COLOURS)
    return _rerendered(dataset, scenes, seed, colour=lambda c: colours[(colours.index(c) + 1) % len(colours)])


def _score(classifier, net, images, scenes):
    preds, feats = classifier.read(net, images)
    labels = {k: v.numpy() for k, v in classifier.labels(scenes).items()}
    return qm.attribute_accuracy(preds, labels), feats


def test_a_perfect_generator_scores_full_accuracy_and_fd_near_zero(instrument):
    """Real images for the prompts: accuracy ~100%; FD to another real set of the same size is its
    finite-sample floor, far below a blob generator's (every shape drawn as a circle, the demo
    teacher's old failure); real images paired with the wrong prompts fail accuracy."""
    classifier, dataset, net = instrument
    images, scenes = _real(dataset, seed=101)
    acc, feats = _score(classifier, net, images, scenes)
    assert acc["mean"] > 0.97 and min(acc.values()) > 0.9, acc
    reference, _ = _real(dataset, seed=202)
    _, ref_feats = classifier.read(net, reference)
    real_fd = qm.frechet_distance(feats, ref_feats)
    _, blob_feats = classifier.read(net, _rerendered(dataset, scenes, 101, shape="circle"))
    assert real_fd < 0.25 * qm.frechet_distance(blob_feats, ref_feats)
    wrong_acc, _ = _score(classifier, net, np.roll(images, 1, axis=0), scenes)  # each image of another prompt
    assert wrong_acc["mean"] < acc["mean"] - 0.3
    assert qm.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert qm.teacher_fidelity(feats, feats) == 0.0


def test_a_recoloured_generator_fails_colour_but_keeps_shape(instrument):
    classifier, dataset, net = instrument
    _, scenes = _real(dataset, seed=303)
    acc, _ = _score(classifier, net, _recoloured(dataset, scenes, 303), scenes)
    assert acc["colour"] < 0.1, acc
    assert acc["shape"] > 0.9 and acc["position"] > 0.9 and acc["background"] > 0.9, acc


def test_colour_interval_of_a_half_recoloured_generator(instrument):
    """Half the images right, half in the wrong colour: colour accuracy near 0.5, its interval contains
    the estimate and is narrower over all prompts than over the first 32."""
    classifier, dataset, net = instrument
    images, scenes = _real(dataset, seed=404)
    images[N // 2:] = _recoloured(dataset, scenes[N // 2:], 404)
    preds, _ = classifier.read(net, images)
    hits = qm.attribute_hits(preds, {k: v.numpy() for k, v in classifier.labels(scenes).items()})["colour"]
    rng = np.random.default_rng(0).permutation(N)
    few, many = qm.bootstrap_ci(hits[rng[:32]]), qm.bootstrap_ci(hits)
    assert 0.4 < many.value < 0.6, many
    for est in (few, many):
        assert est.lo <= est.value <= est.hi
    assert many.hi - many.lo < few.hi - few.lo


def test_trace_root_agrees_with_scipy_sqrtm():
    """The eigenvalue route equals tr(scipy.linalg.sqrtm(S1 S2)) on well-conditioned covariances."""
    import scipy.linalg

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(400, 12)), rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = float(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert qm.trace_sqrt_product(s1, s2) == pytest.approx(want, rel=1e-8)
