"""Tests of mokd_jax.aggregation against float64 numpy references written from the formulas.

Gradients are flat numpy vectors J [K, 17] for the references and a pytree
{'a': [K, 3, 4], 'b': [K, 5]} for the implementation, so that the tree handling (one global
Gram matrix over several leaves) is exercised every time.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_steps import run_one_step

from configs import default
from mokd_jax import aggregation
from mokd_jax.aggregation import linear, projection
from mokd_jax.errors import InputError

SIZE = 17
FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None)
NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def to_tree(rows: np.ndarray) -> dict[str, jax.Array]:
    """J [K, 17] -> {'a': [K, 3, 4], 'b': [K, 5]} in float32."""
    num = rows.shape[0]
    return {
        "a": jnp.asarray(rows[:, :12].reshape(num, 3, 4), jnp.float32),
        "b": jnp.asarray(rows[:, 12:], jnp.float32),
    }


def params_like(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Zero parameters shaped like one objective's gradient: `init` needs them for methods
    with per-parameter state."""
    return jax.tree.map(lambda g: jnp.zeros_like(g[0]), tree)


def to_rows(tree: dict[str, jax.Array]) -> np.ndarray:
    """Inverse of to_tree (with or without the K axis), in float64."""
    a, b = np.asarray(tree["a"], np.float64), np.asarray(tree["b"], np.float64)
    return np.concatenate([a.reshape(a.shape[: a.ndim - 2] + (12,)), b], axis=-1)


def method_input(
    name: str, state, tree: dict[str, jax.Array], losses: jax.Array
) -> dict[str, jax.Array]:
    """What the trainer hands the method for per-objective gradients `tree`: the loss
    vector's pullback of `backward_rows`, i.e. J itself (identity rows) for most methods and
    one weighted row for the one-backward methods."""
    rows = aggregation.backward_rows(
        aggregation.spec(name), state, jnp.asarray(losses, jnp.float32)
    )
    return jax.tree.map(lambda g: jnp.tensordot(rows, g, axes=1), tree)


def skip_unless_defined(name: str, num_objectives: int) -> None:
    if name == "dot" and num_objectives != 2:
        pytest.skip("dot is defined for two objectives (task, distillation) only")


@functools.cache
def jitted_update(name: str, num_objectives: int, hparams: tuple = ()):
    """A jitted (J rows, losses) -> (d [17], weights) for one configuration, compiled once."""
    tx = aggregation.get(name, num_objectives=num_objectives, **dict(hparams))

    @jax.jit
    def run(tree, losses):
        params = params_like(tree)
        state = tx.init(params)
        out, state = tx.update(
            method_input(name, state, tree, losses), state, params, losses=losses
        )
        return out, state.weights

    return run


def aggregate(name, rows, losses, **hparams):
    """d (float64 [17]) and weights from the implementation."""
    run = jitted_update(name, rows.shape[0], tuple(sorted(hparams.items())))
    out, weights = run(to_tree(rows), jnp.asarray(losses, jnp.float32))
    return to_rows(out), np.asarray(weights, np.float64)


# ---------------------------------------------------------------- float64 references


def ref_min_norm(gram: np.ndarray) -> np.ndarray:
    """Exact min-norm simplex weights: the closed form for K = 2, else every active set."""
    if len(gram) == 2:
        spread = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        first = np.clip((gram[1, 1] - gram[0, 1]) / spread, 0, 1)
        return np.array([first, 1 - first])
    best, best_value = None, np.inf
    for size in range(1, len(gram) + 1):
        for support in itertools.combinations(range(len(gram)), size):
            idx = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2 * gram[np.ix_(idx, idx)]
            kkt[:size, size] = kkt[size, :size] = 1
            solution = np.linalg.lstsq(kkt, np.eye(size + 1)[size], rcond=None)[0][:size]
            if solution.min() < -1e-12:
                continue
            weights = np.zeros(len(gram))
            weights[idx] = solution
            if weights @ gram @ weights < best_value:
                best, best_value = weights, weights @ gram @ weights
    return best


def ref_mgda_factors(rows, losses, normalization):
    norms = np.linalg.norm(rows, axis=1)
    factors = {"none": 1, "l2": 1 / norms, "loss": 1 / losses, "loss+": 1 / (losses * norms)}
    return factors[normalization] * np.ones(len(rows))


def ref_mgda(rows, losses, normalization):
    scaled = rows * ref_mgda_factors(rows, losses, normalization)[:, None]
    return ref_min_norm(scaled @ scaled.T) @ scaled


def ref_mokd(rows, losses, rescale="sum_norm", max_norm=10.0):
    logs = rows / losses[:, None]
    pi = ref_min_norm(logs @ logs.T)
    d = pi @ logs
    if rescale in ("sum_norm", "mean_norm"):
        plain = rows.sum(0) if rescale == "sum_norm" else rows.mean(0)
        d *= np.linalg.norm(plain) / np.linalg.norm(d)
    elif rescale == "loss":
        d *= pi @ losses
    if max_norm is not None and np.linalg.norm(d) > max_norm:
        d *= max_norm / np.linalg.norm(d)
    return d


def ref_pcgrad(rows, orders):
    """Sum of the PCGrad-modified gradients; objective k visits the others in orders[k]."""
    modified = []
    for k, order in enumerate(orders):
        g = rows[k].copy()
        for j in order:
            if j != k and g @ rows[j] < 0:
                g -= (g @ rows[j]) / (rows[j] @ rows[j]) * rows[j]
        modified.append(g)
    return np.sum(modified, axis=0)


# ---------------------------------------------------------------- inputs


def random_rows(seed, num_objectives, spread=0.0):
    """(J rows, losses): random gradients whose norms differ by up to 10**spread either way;
    g_0 and g_1 always conflict."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-spread, spread, num_objectives)
    rows = rng.standard_normal((num_objectives, SIZE)) * scales[:, None]
    if rows[0] @ rows[1] > 0:
        rows[1] *= -1
    return rows, rng.uniform(0.1, 3.0, num_objectives)


SEEDS = st.integers(0, 2**32 - 1)


def relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def effective_gradients(name, rows, losses):
    """The rows whose min-norm point d is: log-gradients for mokd, raw ones for mgda."""
    return rows / losses[:, None] if name == "mokd" else rows


# ---------------------------------------------------------------- contract and errors


def test_names_cover_this_round():
    gram_space = {"sum", "weighted", "mean", "mgda", "pcgrad", "mokd", "cagrad", "nash_mtl"}
    gram_space |= {"aligned_mtl", "imtl_g", "upgrad", "gradvac"}
    whole = {"dot", "famo", "mokd_amortized", "graddrop"}
    assert set(aggregation.NAMES) == gram_space | {"db_mtl"} | whole
    assert {n for n in aggregation.NAMES if aggregation.spec(n).whole_transform} == whole


def test_every_method_declares_how_it_is_driven():
    drives = {name: aggregation.spec(name).drive for name in aggregation.NAMES}
    assert {n for n, d in drives.items() if d == aggregation.WEIGHTED_ROW} == {
        "famo",
        "mokd_amortized",
    }
    assert {n for n, d in drives.items() if d == aggregation.REPRESENTATION} == {"graddrop"}
    assert [n for n in aggregation.NAMES if aggregation.spec(n).owns_momentum] == ["dot"]
    assert "weight_decay" not in aggregation.default_hyperparameters("dot")
    with pytest.raises(ValueError, match="backward_weights"):
        aggregation.AggregatorSpec(linear.weighted, drive=aggregation.WEIGHTED_ROW)


def test_weights_are_found_wherever_the_aggregator_sits_in_a_chain():
    params = {"a": jnp.zeros(3)}
    for tx in (
        optax.chain(aggregation.get("mokd"), optax.adam(1e-3)),
        optax.chain(optax.identity(), aggregation.get("upgrad")),
        optax.chain(aggregation.get("famo"), optax.sgd(0.1)),
        aggregation.get("mean", granularity="per_layer"),
    ):
        state = tx.init(params)
        np.testing.assert_array_equal(np.asarray(aggregation.weights(state)), np.zeros(2))
    with pytest.raises(ValueError, match="no aggregator state"):
        aggregation.weights(optax.adam(1e-3).init(params))


def test_unknown_name_raises_input_error_naming_it():
    with pytest.raises(InputError, match=r"aggregator='nope'.*mokd"):
        aggregation.get("nope")


@pytest.mark.parametrize(
    ("name", "hparams", "field"),
    [
        ("mgda", {"normalization": "foo"}, "aggregator.normalization='foo'"),
        ("mgda", {"iterations": 0}, "aggregator.iterations=0"),
        ("mokd", {"max_norm": -1.0}, "aggregator.max_norm=-1.0"),
        ("mokd", {"rescale": "bar"}, "aggregator.rescale='bar'"),
        ("mokd", {"num_objectives": 1}, "aggregator.num_objectives=1"),
        ("sum", {"weights": (1.0, 2.0, 3.0)}, "aggregator.weights=(1.0, 2.0, 3.0)"),
        ("pcgrad", {"seed": -1}, "aggregator.seed=-1"),
        ("mean", {"foo": 3}, "aggregator.foo=3"),
    ],
)
def test_bad_hyperparameter_raises_input_error_naming_field_and_value(name, hparams, field):
    with pytest.raises(InputError) as error:
        aggregation.get(name, **hparams)
    assert str(error.value).startswith(field)


def test_update_without_losses_is_a_clear_error():
    tx = aggregation.get("mean")
    with pytest.raises(TypeError, match="losses"):
        tx.update(to_tree(np.ones((2, SIZE))), tx.init(None))


def test_wrong_number_of_objectives_is_an_input_error():
    tx = aggregation.get("mean", num_objectives=3)
    with pytest.raises(InputError, match="num_objectives=3"):
        tx.update(to_tree(np.ones((2, SIZE))), tx.init(None), losses=jnp.ones(2))


# ---------------------------------------------------------------- Gram matrix


@pytest.mark.parametrize("magnitude", [1e-20, 1.0, 1e20])
def test_gram_matrix_is_overflow_and_underflow_safe(magnitude):
    angle, ratio = 2.0, 1e-3  # cos = -0.416; distillation gradient 1000x smaller than task
    rows = np.zeros((2, SIZE))
    rows[0, 0] = 3.0
    rows[1, :2] = 3.0 * ratio * np.array([np.cos(angle), np.sin(angle)])
    gram, scale = jax.jit(aggregation.gram_matrix)(to_tree(rows * magnitude))
    stats = aggregation.conflict_diagnostics(gram)
    np.testing.assert_allclose(float(scale), 3.0 * magnitude, rtol=1e-6)
    np.testing.assert_allclose(float(stats["cos_task_distill"]), np.cos(angle), rtol=1e-5)
    np.testing.assert_allclose(float(stats["norm_ratio_distill"]), ratio, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gram)[0, 0], 1.0, rtol=1e-6)


def test_gram_matrix_uses_only_the_shared_leaves():
    rows, _ = random_rows(0, 3)
    gram, scale = aggregation.gram_matrix(to_tree(rows), {"a": True, "b": False})
    expected = rows[:, :12] @ rows[:, :12].T
    np.testing.assert_allclose(float(scale) ** 2 * np.asarray(gram), expected, rtol=1e-5)


def mixed_tree(num_objectives: int, magnitude: float = 1.0) -> dict[str, jax.Array]:
    """K-stacked gradients with every kind of leaf the one-pass Gram must handle: float32,
    bfloat16 and float16 leaves, a scalar parameter (rows of shape []), a 1-D and a 4-D one,
    and an excluded leaf full of NaN that must not reach the result."""
    rng = np.random.default_rng(1)

    def leaf(shape, dtype):
        return jnp.asarray(rng.standard_normal((num_objectives, *shape)) * magnitude, dtype)

    return {
        "conv": leaf((3, 3, 4, 8), jnp.float32),
        "dense": leaf((8, 5), jnp.bfloat16),
        "bias": leaf((5,), jnp.float16),
        "temperature": leaf((), jnp.float32),
        "excluded": jnp.full((num_objectives, 6), jnp.nan, jnp.float32),
    }


MIXED_MASK = {"conv": True, "dense": True, "bias": True, "temperature": True, "excluded": False}


def per_leaf_gram(tree: dict[str, jax.Array], mask: dict[str, bool]) -> np.ndarray:
    """sum over the shared leaves of each leaf's own J_l J_l^T, in float64."""
    return sum(
        (rows := np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)) @ rows.T
        for name, leaf in tree.items()
        if mask[name]
    )


@pytest.mark.parametrize("num_objectives", [2, 3])
def test_one_pass_gram_equals_the_sum_of_per_leaf_grams(num_objectives):
    tree = mixed_tree(num_objectives)
    gram, scale = jax.jit(functools.partial(aggregation.gram_matrix, shared_mask=MIXED_MASK))(tree)
    expected = per_leaf_gram(tree, MIXED_MASK)
    np.testing.assert_allclose(float(scale) ** 2 * np.asarray(gram), expected, rtol=1e-5)
    np.testing.assert_allclose(np.max(np.diagonal(gram)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("magnitude", [1e-25, 1e25])
def test_gram_of_tiny_or_huge_gradients_matches_that_of_ordinary_ones(magnitude):
    """Squares of these leave float32's range, so a rescaled candidate of the one pass
    must give the same normalised Gram matrix as J itself does for gradients of norm ~1."""
    mask = {**MIXED_MASK, "dense": False, "bias": False}  # out of (b)float16's range
    gram_fn = jax.jit(functools.partial(aggregation.gram_matrix, shared_mask=mask))
    gram, scale = gram_fn(mixed_tree(3))
    far_gram, far_scale = gram_fn(mixed_tree(3, magnitude))
    np.testing.assert_allclose(np.asarray(far_gram), np.asarray(gram), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(far_scale), float(scale) * magnitude, rtol=1e-5)


RUN_COMPILE_OPTIONS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}
"""XLA's own optimisation settings, which the tests' flags (tests/conftest.py) turn down for
compile speed: with them LLVM vectorises the Gram matrix's reduction, and the package's
fast-math default (`mokd_jax.xla_flags`) lets it reassociate the products."""


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_gram_of_tiny_or_huge_gradients_as_training_compiles_it(magnitude):
    """The rescaled candidates must survive LLVM's optimisations as training compiles them:
    reassociating (c x) (c y) into (x y) c^2 would overflow again. Leaves large enough for
    the vectorised loop, squares far outside float32's range."""
    rng = np.random.default_rng(2)
    tree = {
        "conv": rng.standard_normal((2, 3, 3, 32, 64)).astype(np.float32),
        "dense": rng.standard_normal((2, 64, 100)).astype(np.float32),
        "bias": rng.standard_normal((2, 100)).astype(np.float32),
    }
    far = jax.tree.map(lambda leaf: leaf * np.float32(magnitude), tree)
    gram_fn = jax.jit(aggregation.gram_matrix).lower(tree).compile(RUN_COMPILE_OPTIONS)
    (gram, scale), (far_gram, far_scale) = gram_fn(tree), gram_fn(far)
    expected = per_leaf_gram(tree, {name: True for name in tree})
    np.testing.assert_allclose(float(scale) ** 2 * np.asarray(gram), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(far_gram), np.asarray(gram), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(far_scale), float(scale) * magnitude, rtol=1e-5)


def test_conflict_diagnostics_are_finite_for_zero_gradients():
    rows = np.zeros((2, SIZE))
    stats = aggregation.conflict_diagnostics(aggregation.gram_matrix(to_tree(rows))[0])
    assert all(np.isfinite(float(v)) for v in stats.values())
    rows[1, 0] = 1.0
    stats = aggregation.conflict_diagnostics(aggregation.gram_matrix(to_tree(rows))[0])
    assert float(stats["cos_task_distill"]) == 0.0
    assert (
        np.isfinite(float(stats["norm_ratio_distill"])) and float(stats["norm_ratio_distill"]) > 1e6
    )


# ---------------------------------------------------------------- min-norm solver


@pytest.mark.parametrize("num_objectives", [2, 3, 4])
def test_min_norm_weights_match_the_exact_solution(num_objectives):
    for seed in range(5):
        rows, _ = random_rows(seed, num_objectives)
        gram = rows @ rows.T
        weights = np.asarray(jax.jit(aggregation.min_norm_weights)(jnp.asarray(gram)), float)
        expected = ref_min_norm(gram)
        assert weights.min() >= 0 and abs(weights.sum() - 1) < 1e-6
        np.testing.assert_allclose(weights, expected, atol=1e-5)


def test_min_norm_weights_of_identical_gradients_fall_back_to_the_mean():
    np.testing.assert_allclose(aggregation.min_norm_weights(jnp.ones((2, 2))), [0.5, 0.5])


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["mgda", "mokd"])
@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_min_norm_methods_never_increase_any_objective(name, num_objectives, seed):
    rows, losses = random_rows(seed, num_objectives, spread=3.0)
    d, weights = aggregate(name, rows, losses)
    norms = np.linalg.norm(rows, axis=1)
    assert np.all(rows @ d >= -1e-5 * norms * np.linalg.norm(d))
    pi = weights * (losses if name == "mokd" else 1.0)
    pi /= pi.sum()
    if num_objectives == 2 and 1e-3 < pi[0] < 1 - 1e-3:
        effective = effective_gradients(name, rows, losses)
        projections = effective @ d
        scale = np.linalg.norm(d) * np.linalg.norm(effective, axis=1).max()
        np.testing.assert_allclose(projections[0], projections[1], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("factor", [1e-3, 1e3])
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_mokd_direction_ignores_a_rescaled_loss(factor, num_objectives):
    for seed in range(3):
        rows, losses = random_rows(seed, num_objectives)
        d, _ = aggregate("mokd", rows, losses, max_norm=None)
        rows[1] *= factor
        losses[1] *= factor
        d_scaled, _ = aggregate("mokd", rows, losses, max_norm=None)
        cos = d @ d_scaled / (np.linalg.norm(d) * np.linalg.norm(d_scaled))
        assert cos > 1 - 1e-6


def pcgrad_coefficients(rows, orders):
    gram = jnp.asarray(rows @ rows.T, jnp.float32)
    return np.asarray(projection.projection_coefficients(gram, jnp.asarray(orders)), float)


def test_pcgrad_two_objectives_modified_gradients_no_longer_conflict():
    for seed in range(10):
        rows, _ = random_rows(seed, 2)
        modified = pcgrad_coefficients(rows, [[0, 1], [1, 0]]) @ rows
        assert modified[0] @ modified[1] >= -1e-6 * np.prod(np.linalg.norm(rows, axis=1))


# ---------------------------------------------------------------- parity with numpy


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_mgda_matches_reference(normalization, num_objectives):
    for seed in range(5):
        rows, losses = random_rows(seed, num_objectives, spread=2.0)
        d, _ = aggregate("mgda", rows, losses, normalization=normalization)
        assert relative_error(d, ref_mgda(rows, losses, normalization)) < 1e-5


@pytest.mark.parametrize(
    "hparams",
    [
        {},
        {"rescale": "mean_norm"},
        {"rescale": "loss"},
        {"rescale": "none", "max_norm": None},
        {"max_norm": 0.1},
    ],
)
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_mokd_matches_reference(hparams, num_objectives):
    for seed in range(5):
        rows, losses = random_rows(seed, num_objectives, spread=2.0)
        d, _ = aggregate("mokd", rows, losses, **hparams)
        assert relative_error(d, ref_mokd(rows, losses, **hparams)) < 1e-5


def test_pcgrad_matches_reference_for_two_objectives():
    for seed in range(10):
        rows, losses = random_rows(seed, 2, spread=2.0)
        d, _ = aggregate("pcgrad", rows, losses)
        assert relative_error(d, ref_pcgrad(rows, [[0, 1], [1, 0]])) < 1e-5


def test_pcgrad_projections_match_reference_for_three_objectives_in_any_order():
    for seed in range(5):
        rows, _ = random_rows(seed, 3, spread=2.0)
        rows[2] -= rows[0] + rows[1]
        for orders in ([[0, 1, 2], [0, 1, 2], [0, 1, 2]], [[2, 1, 0], [2, 0, 1], [1, 2, 0]]):
            d = pcgrad_coefficients(rows, orders).sum(0) @ rows
            assert relative_error(d, ref_pcgrad(rows, orders)) < 1e-5


def test_linear_methods_match_reference():
    rows, losses = random_rows(0, 3)
    d, weights = aggregate("sum", rows, losses, weights=(1.0, 0.5, 2.0))
    assert relative_error(d, np.array([1.0, 0.5, 2.0]) @ rows) < 1e-6
    d, _ = aggregate("mean", rows, losses)
    assert relative_error(d, rows.mean(0)) < 1e-6


# ---------------------------------------------------------------- every method


def edge_case(case: str, num_objectives: int) -> np.ndarray:
    return with_edge_case(random_rows(0, num_objectives)[0], case)


def with_edge_case(rows: np.ndarray, case: str) -> np.ndarray:
    """`rows` turned into one of the edge cases every method must survive."""
    rows = rows.copy()
    if case == "zero":
        rows[1] = 0
    elif case == "identical":
        rows[1] = rows[0]
    elif case == "opposite":
        rows[1] = -rows[0]
    elif case == "all zero":
        rows[:] = 0
    return rows * {"tiny": 1e-20, "huge": 1e20}.get(case, 1.0)


@pytest.mark.parametrize("case", ["zero", "identical", "opposite", "all zero", "tiny", "huge"])
@pytest.mark.parametrize("num_objectives", [2, 3])
@pytest.mark.parametrize("name", aggregation.NAMES)
def test_edge_cases_give_finite_updates(name, num_objectives, case):
    skip_unless_defined(name, num_objectives)
    rows = edge_case(case, num_objectives)
    for losses in ([1.0, 1.0, 1.0], [2.0, 0.5, 1.0], [0.0, 1.0, 1e-3]):
        d, weights = aggregate(name, rows, np.array(losses[:num_objectives]))
        assert np.all(np.isfinite(d)) and np.all(np.isfinite(weights))
        if case == "identical" and num_objectives == 2:
            assert d @ rows[0] / (np.linalg.norm(d) * np.linalg.norm(rows[0])) > 1 - 1e-6


@pytest.mark.parametrize("num_objectives", [2, 3])
def test_mokd_step_has_the_norm_of_the_weighted_sum_of_the_raw_gradients(num_objectives):
    """The default rescale: ||d|| = ||sum_k w_k grad L_k|| for the recipe's weights w (KD's
    CE 0.1 / KD 0.9), which the loss vector carries: its rows are w_k grad L_k, its losses
    w_k L_k. 'mean_norm' keeps 1/K of that: the step the default used to take."""
    weights = np.array([0.1, 0.9, 0.5][:num_objectives])
    for seed in range(5):
        raw_rows, raw_losses = random_rows(seed, num_objectives, spread=2.0)
        rows, losses = weights[:, None] * raw_rows, weights * raw_losses
        plain = np.linalg.norm(weights @ raw_rows)
        d, _ = aggregate("mokd", rows, losses, max_norm=None)
        np.testing.assert_allclose(np.linalg.norm(d), plain, rtol=1e-5)
        d_mean, _ = aggregate("mokd", rows, losses, max_norm=None, rescale="mean_norm")
        np.testing.assert_allclose(np.linalg.norm(d_mean), plain / num_objectives, rtol=1e-5)


def test_mokd_falls_back_to_the_mean_direction_when_one_gradient_is_zero():
    """Along the mean of the log-gradients, i.e. g_0 here, at the plain update's norm."""
    rows = edge_case("zero", 2)
    for losses in ([1.0, 1.0], [2.0, 0.0]):
        d, _ = aggregate("mokd", rows, np.array(losses))
        assert relative_error(d, rows.sum(0)) < 1e-6
        d, _ = aggregate("mokd", rows, np.array(losses), rescale="mean_norm")
        assert relative_error(d, rows.mean(0)) < 1e-6
    # Plain MGDA keeps its textbook answer: 0 is in the convex hull, so d = 0.
    d, _ = aggregate("mgda", rows, np.array([1.0, 1.0]))
    assert np.linalg.norm(d) == 0


def test_mask_of_the_wrong_structure_is_an_input_error():
    tx = aggregation.get("mean", shared={"a": True, "c": False})
    with pytest.raises(InputError, match="aggregator.shared"):
        tx.update(to_tree(np.ones((2, SIZE))), tx.init(None), losses=jnp.ones(2))


PARAMETER_METHODS = [
    n for n in aggregation.NAMES if aggregation.spec(n).drive != aggregation.REPRESENTATION
]
"""The methods that take parameter gradients (GradDrop takes representation gradients and
has tests of its own in test_aggregation_step_changing.py)."""


@pytest.mark.parametrize("name", PARAMETER_METHODS)
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_weights_reproduce_the_shared_update(name, num_objectives):
    skip_unless_defined(name, num_objectives)
    rows, losses = random_rows(1, num_objectives)
    tx = aggregation.get(name, num_objectives=num_objectives)
    params = params_like(to_tree(rows))
    state = tx.init(params)
    assert state.weights.shape == (num_objectives,) and state.weights.dtype == jnp.float32
    grads = method_input(name, state, to_tree(rows), losses)
    out, state = jax.jit(tx.update)(grads, state, params, losses=jnp.asarray(losses))
    assert state.weights.shape == (num_objectives,)
    d = to_rows(out)
    assert relative_error(np.asarray(state.weights, np.float64) @ rows, d) < 1e-5


@pytest.mark.parametrize(
    "name",
    [n for n in PARAMETER_METHODS if aggregation.spec(n).drive == aggregation.PER_OBJECTIVE],
)
def test_non_shared_leaves_get_their_rows_summed(name):
    rows, losses = random_rows(2, 2 if name == "dot" else 3)
    tree = to_tree(rows)
    k = len(rows)
    only_a = aggregation.get(name, num_objectives=k)
    masked = aggregation.get(name, num_objectives=k, shared={"a": True, "b": False})
    by_path = aggregation.get(name, num_objectives=k, shared=lambda params: {"a": True, "b": False})
    a_params = params_like({"a": tree["a"]})
    expected, _ = only_a.update({"a": tree["a"]}, only_a.init(a_params), a_params, losses=losses)
    for tx in (masked, by_path):
        params = jax.tree.map(lambda g: g[0], tree)
        out, _ = jax.jit(tx.update)(tree, tx.init(params), params, losses=jnp.asarray(losses))
        np.testing.assert_allclose(out["b"], tree["b"].sum(0), rtol=1e-6)
        np.testing.assert_allclose(out["a"], expected["a"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", aggregation.NAMES)
def test_deterministic_for_a_fixed_seed(name):
    rows, losses = random_rows(3, 2 if name == "dot" else 3)
    rows[-1] -= rows[0]

    def three_steps():
        tx = aggregation.get(name, num_objectives=len(rows))
        params = params_like(to_tree(rows))
        state, outs = tx.init(params), []
        update = jax.jit(tx.update)
        for _ in range(3):
            grads = method_input(name, state, to_tree(rows), losses)
            out, state = update(grads, state, params, losses=jnp.asarray(losses))
            outs.append(to_rows(out))
        return np.stack(outs)

    np.testing.assert_array_equal(three_steps(), three_steps())


def test_pcgrad_order_comes_from_the_state_key():
    tx = aggregation.get("pcgrad", num_objectives=3, seed=7)
    state = tx.init(None)
    rows, losses = random_rows(4, 3)
    _, new_state = tx.update(to_tree(rows), state, losses=jnp.asarray(losses))
    assert not np.array_equal(state.key, new_state.key)
    np.testing.assert_array_equal(tx.init(None).key, state.key)


@pytest.mark.parametrize("name", aggregation.NAMES)
def test_chains_with_sgd_under_jit(name):
    rows, losses = random_rows(5, 2)
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), to_tree(rows))
    aggregator = aggregation.get(name)
    tx = optax.chain(aggregator, optax.sgd(0.1, momentum=0.9))

    @jax.jit
    def step(params, opt_state, grads, losses):
        updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
        return optax.apply_updates(params, updates), opt_state

    grads = method_input(name, aggregator.init(params), to_tree(rows), losses)
    new_params, opt_state = step(params, tx.init(params), grads, jnp.asarray(losses))
    combined, _ = aggregator.update(grads, aggregator.init(params), params, losses=losses)
    np.testing.assert_allclose(to_rows(new_params), -0.1 * to_rows(combined), rtol=1e-5)
    assert aggregation.weights(opt_state).shape == (2,)


def float64_update(name: str, rows: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Two steps of `name` on float64 gradients and losses under x64: the second step's
    update [17] (a representation method: its combination of the rows as representation
    gradients [K, 1, 17])."""
    with jax.enable_x64(True):
        tree = jax.tree.map(lambda g: g.astype(jnp.float64), to_tree(rows))
        losses = jnp.asarray(losses, jnp.float64)
        tx = aggregation.get(name, num_objectives=len(rows))
        state = tx.init(params_like(tree))
        spec = aggregation.spec(name)
        if spec.drive == aggregation.REPRESENTATION:
            combined, _ = jax.jit(spec.combine_representation)(state, jnp.asarray(rows)[:, None])
            assert combined.dtype == jnp.float64
            return np.asarray(combined[0])
        update = jax.jit(functools.partial(tx.update, losses=losses))
        for _ in range(2):
            out, state = update(method_input(name, state, tree, losses), state, params_like(tree))
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out))
        return to_rows(out)


@pytest.mark.parametrize("name", aggregation.NAMES)
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_every_method_runs_on_float64_gradients(name, num_objectives):
    skip_unless_defined(name, num_objectives)
    rows, losses = random_rows(4, num_objectives)
    assert np.all(np.isfinite(float64_update(name, rows, losses)))


# ---------------------------------------------------------------- through the trainer's step


def student_step_norm(aggregator: str, **mokd_hparams) -> float:
    """||change of the student's parameters|| after one trainer step from one fixed state and
    batch, on the KD recipe's losses (CE 0.1 / KD 0.9) with plain SGD and no weight decay:
    lr x the norm of the aggregated update (momentum does not act on the first step)."""
    config = default.get_config("smoke")
    config.aggregator = aggregator
    config.distill.update(task_weight=0.1, logit_weight=0.9)
    config.aggregation.mokd.update(max_norm=None, **mokd_hparams)
    config.student.update(
        optimizer="sgd", weight_decay=0.0, schedule="step", warmup_steps=0, learning_rate=0.1
    )
    before, after, _ = run_one_step(config)
    deltas = jax.tree.map(np.subtract, after.params["student"], before.params["student"])
    return float(np.sqrt(sum(np.sum(np.square(d)) for d in jax.tree.leaves(deltas))))


@pytest.mark.slow  # three of the trainer's steps compiled (about 30 s on 2 cores)
def test_mokd_step_in_the_trainer_has_the_norm_of_the_kd_recipes_step():
    """The same learning rate moves the student as far under mokd as under the summed KD
    recipe; the 'mean_norm' rescale moves it half as far (K = 2)."""
    summed = student_step_norm("sum")
    assert summed > 0
    np.testing.assert_allclose(student_step_norm("mokd"), summed, rtol=1e-4)
    np.testing.assert_allclose(
        student_step_norm("mokd", rescale="mean_norm"), summed / 2, rtol=1e-4
    )
