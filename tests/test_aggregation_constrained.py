"""Tests of cagrad, nash_mtl, upgrad, imtl_g and aligned_mtl against float64 references
written from docs/aggregators.md, and of the properties that file asks of them.

The references solve each method's problem independently of the implementation's solver:
an exact face-by-face solution for CAGrad, scipy's root finder for the Nash equations,
scipy's bounded least squares for UPGrad's projections, numpy's pinv and eigh for the
closed forms. The generic contract (finite edge cases with default hyperparameters, jit,
determinism, masks, per-layer granularity) is tested for every name in test_aggregation.py
and test_aggregation_stateful.py.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from scipy.optimize import lsq_linear, root
from test_aggregation import FEW, SEEDS, aggregate, edge_case, random_rows, relative_error

from mokd_jax import aggregation
from mokd_jax.aggregation import balanced
from mokd_jax.errors import InputError

NEW_METHODS = ("cagrad", "nash_mtl", "upgrad", "imtl_g", "aligned_mtl")
FLOAT32_EPS = float(np.finfo(np.float32).eps)

# ---------------------------------------------------------------- float64 references


def ref_cagrad_weights(rows, alpha):
    """argmin over the simplex of <g_w, g_0> + c ||g_w||, exactly.

    On the relative interior of a face S (where g_w != 0) stationarity reads
    l_S + c G_S w_S / ||g_w|| = mu 1, with l = G 1/K, so w_S = t (mu p - q) with
    p = G_S^-1 1, q = G_S^-1 l_S and t = ||g_w|| / c; ||g_w||^2 = w^T G w turns into the
    quadratic (1^T p) mu^2 - 2 (1^T q) mu + l_S^T q - c^2 = 0 and sum w = 1 fixes t. The
    minimum is at one of these points or at a vertex.
    """
    num = len(rows)
    gram = rows @ rows.T
    linear = gram @ np.full(num, 1 / num)
    radius = alpha * np.linalg.norm(rows.mean(0))

    def objective(w):
        return linear @ w + radius * np.sqrt(max(w @ gram @ w, 0.0))

    candidates = list(np.eye(num))
    for size in range(2, num + 1):
        for support in itertools.combinations(range(num), size):
            idx = list(support)
            p = np.linalg.solve(gram[np.ix_(idx, idx)], np.ones(size))
            q = np.linalg.solve(gram[np.ix_(idx, idx)], linear[idx])
            a, b, c = p.sum(), q.sum(), linear[idx] @ q - radius**2
            if b * b - a * c < 0:
                continue
            for mu in ((b + np.sqrt(b * b - a * c)) / a, (b - np.sqrt(b * b - a * c)) / a):
                if mu * a - b <= 0:
                    continue
                w = np.zeros(num)
                w[idx] = (mu * p - q) / (mu * a - b)
                if w.min() >= -1e-12:
                    candidates.append(w)
    return min(candidates, key=objective)


def ref_cagrad(rows, alpha=0.5, rescale=True):
    mean = rows.mean(0)
    bent = ref_cagrad_weights(rows, alpha) @ rows
    d = mean + alpha * np.linalg.norm(mean) / np.linalg.norm(bent) * bent
    return d / (1 + alpha**2) if rescale else d


def ref_nash_weights(rows):
    """w > 0 with (G w)_k w_k = 1, G normalised by its Frobenius norm, by scipy's root finder
    on log w (which keeps w positive)."""
    gram = rows @ rows.T
    gram /= np.linalg.norm(gram)

    def equations(z):
        w = np.exp(z)
        return w * (gram @ w) - 1

    def jacobian(z):
        w = np.exp(z)
        return (np.diag(gram @ w) + w[:, None] * gram) * w[None, :]

    start = -0.5 * np.log(np.diag(gram))
    solution = root(equations, start, jac=jacobian, method="hybr", tol=1e-15)
    assert np.abs(equations(solution.x)).max() < 1e-10
    return np.exp(solution.x)


def ref_nash_mtl(rows, max_norm=1.0):
    d = ref_nash_weights(rows) @ rows
    if max_norm is not None and np.linalg.norm(d) > max_norm:
        d *= max_norm / np.linalg.norm(d)
    return d


def ref_upgrad(rows):
    """Each v_k = argmin v^T G' v s.t. v >= e_k / K as a bounded least-squares problem:
    v^T G' v = ||L^T v||^2 with G' = L L^T."""
    num = len(rows)
    gram = rows @ rows.T
    half = np.linalg.cholesky(gram / np.trace(gram) + 1e-4 * np.eye(num)).T
    w = sum(
        lsq_linear(half, np.zeros(num), bounds=(lower, np.inf), method="bvls", tol=1e-15).x
        for lower in np.eye(num) / num
    )
    return w @ rows


def ref_imtl_g(rows):
    gram = rows @ rows.T
    v = np.linalg.pinv(gram) @ np.sqrt(np.diag(gram))
    return v / v.sum() @ rows


def ref_scale(eigenvalues, scale_mode):
    """lambda_scale among the kept eigenvalues (ascending): torch.median is the lower one."""
    return {
        "min": eigenvalues[0],
        "median": eigenvalues[(len(eigenvalues) - 1) // 2],
        "rmse": eigenvalues.mean(),
    }[scale_mode]


def kept_spectrum(gram):
    """Eigenvalues (ascending) and eigenvectors of G above the implementation's rank
    tolerance, 1e-6 of the largest (which no full-rank input here comes near)."""
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    kept = eigenvalues > 1e-6 * eigenvalues[-1]
    return eigenvalues[kept], eigenvectors[:, kept]


def ref_aligned_mtl(rows, scale_mode="min"):
    eigenvalues, eigenvectors = kept_spectrum(rows @ rows.T)
    alignment = (
        np.sqrt(ref_scale(eigenvalues, scale_mode))
        * eigenvectors
        @ np.diag(eigenvalues**-0.5)
        @ eigenvectors.T
    )
    return alignment @ np.full(len(rows), 1 / len(rows)) @ rows


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("hparams", [{}, {"alpha": 0.2}, {"alpha": 0.9, "rescale": False}])
@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_cagrad_matches_reference(hparams, num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=2.0)
    d, _ = aggregate("cagrad", rows, losses, **hparams)
    assert relative_error(d, ref_cagrad(rows, **hparams)) < 1e-5


@pytest.mark.parametrize("max_norm", [1.0, 0.01, None])
@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_nash_mtl_matches_reference(max_norm, num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=2.0)
    d, _ = aggregate("nash_mtl", rows, losses, max_norm=max_norm)
    assert relative_error(d, ref_nash_mtl(rows, max_norm)) < 1e-5


@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_upgrad_matches_reference(num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=2.0)
    d, _ = aggregate("upgrad", rows, losses)
    assert relative_error(d, ref_upgrad(rows)) < 1e-5


@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_imtl_g_matches_reference(num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=2.0)
    d, _ = aggregate("imtl_g", rows, losses)
    assert relative_error(d, ref_imtl_g(rows)) < 1e-5


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_aligned_mtl_matches_reference(scale_mode, num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=1.0)
    d, _ = aggregate("aligned_mtl", rows, losses, scale_mode=scale_mode)
    # d is proportional to sqrt(lambda_scale), and the float32 Gram matrix knows its small
    # eigenvalues only to about eps * lambda_max: the relative error grows as
    # eps * cond(G) (~5e-4 measured at cond 1e4), which no float32 implementation can beat.
    # 1e-5 holds up to cond ~100; beyond, the bound is the float32 one with a margin of 10.
    tolerance = max(1e-5, 10 * FLOAT32_EPS * np.linalg.cond(rows @ rows.T))
    assert relative_error(d, ref_aligned_mtl(rows, scale_mode)) < tolerance


@pytest.mark.parametrize(
    ("name", "reference"),
    [("cagrad", ref_cagrad), ("nash_mtl", ref_nash_mtl), ("upgrad", ref_upgrad)],
)
def test_iterative_and_exact_solvers_hold_for_five_objectives(name, reference):
    for seed in range(5):
        rows, losses = random_rows(seed, 5, spread=1.0)
        d, _ = aggregate(name, rows, losses)
        assert relative_error(d, reference(rows)) < 1e-5


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_upgrad_never_increases_any_objective(num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=3.0)
    d, weights = aggregate("upgrad", rows, losses)
    norms = np.linalg.norm(rows, axis=1)
    # The KKT conditions give (G' w)_j >= 0 for the regularised G' = G / tr(G) + 1e-4 I, so
    # <d, g_j> = (G w)_j >= -1e-4 tr(G) w_j exactly; the rest is float32 round-off.
    regularisation = 1e-4 * norms @ norms * np.abs(weights)
    assert np.all(rows @ d >= -regularisation - 1e-5 * norms * np.linalg.norm(d))


@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_imtl_g_projects_equally_and_ignores_a_rescaled_gradient(num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=2.0)
    d, _ = aggregate("imtl_g", rows, losses)
    projections = rows @ d / np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-5)
    for factor in (1e-3, 1e3):
        scaled = rows.copy()
        scaled[1] *= factor
        d_scaled, _ = aggregate("imtl_g", scaled, losses)
        cos = d @ d_scaled / (np.linalg.norm(d) * np.linalg.norm(d_scaled))
        assert cos > 1 - 1e-6


@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_nash_mtl_solves_the_bargaining_equations_and_clips(num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=2.0)
    _, weights = aggregate("nash_mtl", rows, losses, max_norm=None)
    gram = rows @ rows.T
    gram /= np.linalg.norm(gram)
    np.testing.assert_allclose(weights * (gram @ weights), 1.0, rtol=1e-4)
    for max_norm in (1.0, 1e-3, 1e6):
        d, _ = aggregate("nash_mtl", rows, losses, max_norm=max_norm)
        assert np.linalg.norm(d) <= max_norm * (1 + 1e-6)
        expected = weights @ rows * min(1.0, max_norm / np.linalg.norm(weights @ rows))
        assert relative_error(d, expected) < 1e-5


@pytest.mark.parametrize("dependent", [False, True])
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_gradients_have_equal_singular_values(scale_mode, dependent):
    for seed in range(5):
        rows, _ = random_rows(seed, 3, spread=0.5)
        if dependent:
            rows[2] = rows[0] - 2 * rows[1]
        gram = rows @ rows.T
        gram /= gram.diagonal().max()
        alignment = balanced.alignment_matrix(jnp.asarray(gram, jnp.float32), scale_mode)
        alignment = np.asarray(alignment, np.float64)
        # B J are the aligned gradients; their Gram matrix is B G B.
        singular2 = np.linalg.eigvalsh(alignment @ gram @ alignment)
        eigenvalues, _ = kept_spectrum(gram)
        target = ref_scale(eigenvalues, scale_mode)
        rank = len(eigenvalues)
        assert rank == (2 if dependent else 3)
        np.testing.assert_allclose(singular2[-rank:], target, rtol=1e-4)
        np.testing.assert_allclose(singular2[:-rank], 0.0, atol=1e-5 * target)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_cagrad_without_alpha_is_the_mean(num_objectives, rescale):
    for seed in range(5):
        rows, losses = random_rows(seed, num_objectives, spread=2.0)
        d, _ = aggregate("cagrad", rows, losses, alpha=0.0, rescale=rescale)
        assert relative_error(d, rows.mean(0)) < 1e-6


@pytest.mark.parametrize("name", NEW_METHODS)
def test_a_zero_gradient_leaves_d_along_the_other(name):
    rows = edge_case("zero", 2)
    d, _ = aggregate(name, rows, np.ones(2))
    assert d @ rows[0] / (np.linalg.norm(d) * np.linalg.norm(rows[0])) > 1 - 1e-6


@pytest.mark.parametrize("magnitude", [1e-20, 1e20])
@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("cagrad", {}),
        ("nash_mtl", {"max_norm": None}),
        ("upgrad", {}),
        ("imtl_g", {}),
        ("aligned_mtl", {}),
    ],
)
def test_weights_ignore_a_common_gradient_scale(name, hparams, magnitude):
    rows, losses = random_rows(0, 3, spread=1.0)
    _, weights = aggregate(name, rows, losses, **hparams)
    _, scaled_weights = aggregate(name, rows * magnitude, losses, **hparams)
    np.testing.assert_allclose(scaled_weights, weights, rtol=1e-5)


@pytest.mark.parametrize("case", ["zero", "identical", "opposite", "all zero", "tiny", "huge"])
@pytest.mark.parametrize("num_objectives", [2, 3])
@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("cagrad", {"alpha": 0.0, "rescale": False}),
        ("cagrad", {"alpha": 2.0}),
        ("nash_mtl", {"max_norm": None}),
        ("aligned_mtl", {"scale_mode": "median"}),
        ("aligned_mtl", {"scale_mode": "rmse"}),
    ],
)
def test_edge_cases_stay_finite_with_other_hyperparameters(name, hparams, num_objectives, case):
    rows = edge_case(case, num_objectives)
    d, weights = aggregate(name, rows, np.ones(num_objectives), **hparams)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(weights))


def test_imtl_g_gives_zero_for_opposite_gradients():
    d, weights = aggregate("imtl_g", edge_case("opposite", 2), np.ones(2))
    assert np.all(d == 0) and np.all(weights == 0)


# ---------------------------------------------------------------- hyperparameters


def test_new_methods_are_registered():
    assert set(NEW_METHODS) <= set(aggregation.NAMES)


@pytest.mark.parametrize(
    ("name", "hparams", "field"),
    [
        ("cagrad", {"alpha": -0.1}, "aggregator.alpha=-0.1"),
        ("cagrad", {"alpha": float("nan")}, "aggregator.alpha=nan"),
        ("cagrad", {"rescale": 1}, "aggregator.rescale=1"),
        ("cagrad", {"iterations": 0}, "aggregator.iterations=0"),
        ("nash_mtl", {"max_norm": 0.0}, "aggregator.max_norm=0.0"),
        ("nash_mtl", {"iterations": 2.5}, "aggregator.iterations=2.5"),
        ("aligned_mtl", {"scale_mode": "max"}, "aggregator.scale_mode='max'"),
        ("upgrad", {"num_objectives": 13}, "aggregator.num_objectives=13"),
        ("imtl_g", {"alpha": 0.5}, "aggregator.alpha=0.5"),
    ],
)
def test_bad_hyperparameter_raises_input_error_naming_field_and_value(name, hparams, field):
    with pytest.raises(InputError) as error:
        aggregation.get(name, **hparams)
    assert str(error.value).startswith(field)
