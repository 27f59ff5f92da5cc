"""Tests of the `granularity` option and of the stateful methods `gradvac` and `db_mtl`.

References are float64 numpy, written from docs/aggregators.md, and run over several
consecutive steps with fresh gradients each step, so that the state (similarity targets,
moving averages, PRNG key) is compared as it evolves. Gradients are flat rows J [K, 17]
for the references and a pytree {'a': [K, 3, 4], 'b': [K, 5]} for the implementation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_aggregation import with_edge_case

from mokd_jax import aggregation
from mokd_jax.aggregation import projection
from mokd_jax.errors import InputError

FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None)
SEEDS = st.integers(0, 2**32 - 1)
STEPS = 4
WHOLE_TRANSFORMS = tuple(n for n in aggregation.NAMES if aggregation.spec(n).whole_transform)
"""Names that are whole transforms, with no per-objective problem to split per layer."""
GRAM_METHODS = tuple(name for name in aggregation.NAMES if name not in WHOLE_TRANSFORMS)


def to_tree(rows: np.ndarray) -> dict[str, jax.Array]:
    """J [K, 17] -> {'a': [K, 3, 4], 'b': [K, 5]} in float32."""
    num = rows.shape[0]
    return {
        "a": jnp.asarray(rows[:, :12].reshape(num, 3, 4), jnp.float32),
        "b": jnp.asarray(rows[:, 12:], jnp.float32),
    }


def to_rows(tree: dict[str, jax.Array]) -> np.ndarray:
    """Inverse of to_tree for the combined update (no K axis), in float64."""
    return np.concatenate([np.ravel(tree["a"]), np.ravel(tree["b"])]).astype(np.float64)


def params_like(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return jax.tree.map(lambda g: jnp.zeros_like(g[0]), tree)


def step_inputs(seed: int, num_objectives: int, steps: int = STEPS):
    """`steps` fresh (J rows, losses): norms up to 10x apart, g_0 and g_1 conflicting."""
    rng = np.random.default_rng(seed)
    inputs = []
    for _ in range(steps):
        scales = 10.0 ** rng.uniform(-1, 1, num_objectives)
        rows = rng.standard_normal((num_objectives, 17)) * scales[:, None]
        if rows[0] @ rows[1] > 0:
            rows[1] *= -1
        inputs.append((rows, rng.uniform(0.1, 3.0, num_objectives)))
    return inputs


@functools.cache
def transform(name: str, num_objectives: int, hparams: tuple = (), **options):
    """(tx, jitted update) for one configuration, compiled once."""
    tx = aggregation.get(name, num_objectives=num_objectives, **options, **dict(hparams))
    return tx, jax.jit(tx.update)


def run_steps(name, inputs, hparams=(), **options):
    """The implementation's d (float64 [17]) and state after each step."""
    tx, update = transform(name, inputs[0][0].shape[0], tuple(sorted(hparams)), **options)
    params = params_like(to_tree(inputs[0][0]))
    state, results = tx.init(params), []
    for rows, losses in inputs:
        out, state = update(to_tree(rows), state, params, losses=jnp.asarray(losses))
        results.append((to_rows(out), state))
    return results


def relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


# ---------------------------------------------------------------- float64 references


def ref_gradvac_step(rows, targets, orders, beta=0.5):
    """One GradVac step; returns d and updates `targets` in place."""
    modified = []
    for k, order in enumerate(orders):
        g = rows[k].copy()
        for j in order:
            if j == k:
                continue
            norm_j = np.linalg.norm(rows[j])
            rho = g @ rows[j] / (np.linalg.norm(g) * norm_j)
            phi = targets[k, j]
            if rho < phi:
                sine_rho, sine_phi = np.sqrt(1 - rho**2), np.sqrt(1 - phi**2)
                g = g + rows[j] * np.linalg.norm(g) * (phi * sine_rho - rho * sine_phi) / (
                    norm_j * sine_phi
                )
            targets[k, j] = (1 - beta) * phi + beta * rho
        modified.append(g)
    return np.sum(modified, axis=0)


class RefDBMTL:
    """DB-MTL in float64: moving averages of the log-gradients, rescaled to equal length."""

    def __init__(self, beta=0.9, beta_sigma=0.0):
        self.beta, self.beta_sigma, self.count, self.buffers = beta, beta_sigma, 0, 0.0

    def step(self, rows, losses):
        self.count += 1
        rate = self.beta / self.count**self.beta_sigma
        log_gradients = rows / (losses[:, None] + 1e-8)
        self.buffers = log_gradients + rate * (self.buffers - log_gradients)
        norms = np.linalg.norm(self.buffers, axis=1)
        return (norms.max() / norms) @ self.buffers


# ---------------------------------------------------------------- granularity


def single_leaf_reference(name, inputs, leaf):
    """The global method run on the tree {leaf: ...} alone: (updates, weights) per step."""
    num_objectives = inputs[0][0].shape[0]
    tx, update = transform(name, num_objectives)
    trees = [{leaf: to_tree(rows)[leaf]} for rows, _ in inputs]
    params = params_like(trees[0])
    state, results = tx.init(params), []
    for tree, (_, losses) in zip(trees, inputs, strict=True):
        out, state = update(tree, state, params, losses=jnp.asarray(losses))
        results.append((np.asarray(out[leaf], np.float64), np.asarray(state.weights)))
    return results


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_per_layer_is_the_global_method_on_each_leaf_alone(name):
    inputs = step_inputs(0, 3, steps=3)
    per_layer = run_steps(name, inputs, granularity="per_layer")
    a_alone = single_leaf_reference(name, inputs, "a")
    b_alone = single_leaf_reference(name, inputs, "b")
    for (d, state), (a, weights_a), (b, weights_b) in zip(per_layer, a_alone, b_alone, strict=True):
        expected = np.concatenate([a.ravel(), b])
        np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        assert state.weights.shape == (3,) and state.weights.dtype == jnp.float32
        np.testing.assert_allclose(state.weights, (weights_a + weights_b) / 2, rtol=1e-5)


@pytest.mark.parametrize("name", ["db_mtl", "mokd"])
def test_per_layer_keeps_one_state_per_shared_leaf_and_sums_the_others(name):
    rows, losses = step_inputs(1, 3, steps=1)[0]
    tree = {**to_tree(rows), "c": jnp.asarray(rows[:, :2], jnp.float32)}
    tx = aggregation.get(
        name, num_objectives=3, granularity="per_layer", shared={"a": True, "b": True, "c": False}
    )
    params = params_like(tree)
    state = tx.init(params)
    out, state = jax.jit(tx.update)(tree, state, params, losses=jnp.asarray(losses))
    np.testing.assert_allclose(out["c"], tree["c"].sum(0), rtol=1e-6)
    alone, _ = single_leaf_reference(name, [(rows, losses)], "b")[0]
    np.testing.assert_allclose(out["b"], alone, rtol=1e-5, atol=1e-6)
    if name == "db_mtl":  # buffers differ in shape: a tuple of per-leaf states
        assert [s.buffers[0].shape for s in state.leaves] == [(3, 3, 4), (3, 5)]
    else:  # Gram-space weightings are vmapped: one state with a leading leaf axis
        assert state.leaves.weights.shape == (2, 3)


@pytest.mark.parametrize("name", ["sum", "mean"])
def test_per_layer_fixed_combinations_equal_global(name):
    inputs = step_inputs(2, 3, steps=1)
    (d_layer, _), (d_global, _) = (
        run_steps(name, inputs, granularity="per_layer")[0],
        run_steps(name, inputs)[0],
    )
    np.testing.assert_allclose(d_layer, d_global, rtol=1e-6)


@pytest.mark.parametrize("name", WHOLE_TRANSFORMS)
def test_whole_transforms_refuse_per_layer(name):
    with pytest.raises(InputError) as error:
        aggregation.get(name, granularity="per_layer")
    assert str(error.value).startswith("aggregator.granularity='per_layer'")


@pytest.mark.parametrize("name", ["mean", "db_mtl"])
def test_init_without_params_is_a_clear_error_where_state_needs_them(name):
    granularity = "per_layer" if name == "mean" else "global"
    tx = aggregation.get(name, granularity=granularity)
    with pytest.raises(TypeError, match="params"):
        tx.init(None)


def test_a_mask_selecting_nothing_is_an_input_error():
    tx = aggregation.get("mean", shared={"a": False, "b": False})
    with pytest.raises(InputError, match="aggregator.shared"):
        tx.update(to_tree(np.ones((2, 17))), tx.init(None), losses=jnp.ones(2))


# ---------------------------------------------------------------- gradvac


@pytest.mark.parametrize("num_objectives", [2, 3])
@pytest.mark.parametrize("hparams", [(), (("beta", 0.2),)])
@FEW
@given(seed=SEEDS)
def test_gradvac_matches_reference_over_steps(num_objectives, hparams, seed):
    inputs = step_inputs(seed, num_objectives)
    key = aggregation.get("gradvac", num_objectives=num_objectives).init(None).key
    targets = np.zeros((num_objectives, num_objectives))
    for (rows, _), (d, state) in zip(inputs, run_steps("gradvac", inputs, hparams), strict=True):
        orders = np.asarray(projection.visiting_orders(key, num_objectives)[0])
        expected = ref_gradvac_step(rows, targets, orders, **dict(hparams))
        assert relative_error(d, expected) < 1e-5
        np.testing.assert_allclose(state.targets, targets, atol=1e-5)
        key = state.key


@pytest.mark.parametrize("num_objectives", [2, 3])
@FEW
@given(seed=SEEDS)
def test_gradvac_raises_each_fired_pair_to_its_target(num_objectives, seed):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((num_objectives, 6)) * 10.0 ** rng.uniform(
        -1, 1, (num_objectives, 1)
    )
    targets = rng.uniform(-0.5, 0.9, (num_objectives, num_objectives))
    orders = np.stack([rng.permutation(num_objectives) for _ in range(num_objectives)])
    coefficients, _ = projection.vaccine_coefficients(
        jnp.asarray(rows @ rows.T, jnp.float32), jnp.asarray(orders), jnp.asarray(targets), 0.5
    )
    coefficients = np.asarray(coefficients, np.float64)

    def cos(u, v):
        return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))

    for k in range(num_objectives):
        # Each pair is visited once, so the last edit of g'_k is the only multiple of
        # g_last in it: removing it gives g'_k as it was before that edit.
        last = [j for j in orders[k] if j != k][-1]
        after = coefficients[k] @ rows
        rho = cos(after - coefficients[k, last] * rows[last], rows[last])
        if rho < targets[k, last]:
            assert cos(after, rows[last]) >= rho
            np.testing.assert_allclose(cos(after, rows[last]), targets[k, last], atol=1e-5)
        else:
            assert coefficients[k, last] == 0


def test_gradvac_is_deterministic_per_seed_and_the_seed_matters():
    inputs = step_inputs(3, 3)

    def updates(hparams):
        return np.stack([d for d, _ in run_steps("gradvac", inputs, hparams)])

    np.testing.assert_array_equal(updates(()), updates(()))
    assert not np.allclose(updates(()), updates((("seed", 1),)), rtol=1e-4)


def test_gradvac_stays_finite_when_targets_reach_one():
    """Identical gradients drive every target to 1 (float32); then a conflict arrives."""
    rows, losses = step_inputs(4, 2, steps=1)[0]
    same = np.stack([rows[0], rows[0]])
    inputs = [(same, losses)] * 40 + [(rows, losses)] * 2
    results = run_steps("gradvac", inputs)
    assert float(results[39][1].targets[0, 1]) == 1.0
    assert all(np.all(np.isfinite(d)) for d, _ in results)


# ---------------------------------------------------------------- db_mtl


@pytest.mark.parametrize("num_objectives", [2, 3])
@pytest.mark.parametrize("hparams", [(), (("beta_sigma", 0.5),), (("beta", 0.0),)])
@FEW
@given(seed=SEEDS)
def test_db_mtl_matches_reference_over_steps(num_objectives, hparams, seed):
    inputs = step_inputs(seed, num_objectives)
    reference = RefDBMTL(**dict(hparams))
    for (rows, losses), (d, state) in zip(
        inputs, run_steps("db_mtl", inputs, hparams), strict=True
    ):
        assert relative_error(d, reference.step(rows, losses)) < 1e-5
        buffers = np.concatenate(
            [np.asarray(b, np.float64).reshape(num_objectives, -1) for b in state.buffers], 1
        )
        scale = np.abs(reference.buffers).max()
        np.testing.assert_allclose(buffers, reference.buffers, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("factor", [1e-3, 1e3])
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_db_mtl_ignores_a_rescaled_loss(factor, num_objectives):
    inputs = step_inputs(5, num_objectives)
    factors = np.ones(num_objectives)
    factors[1] = factor
    scaled = [(rows * factors[:, None], losses * factors) for rows, losses in inputs]
    for (d, _), (d_scaled, _) in zip(
        run_steps("db_mtl", inputs), run_steps("db_mtl", scaled), strict=True
    ):
        # Only eps in L_k + eps (1e-8 next to losses down to 1e-4 here) tells them apart.
        assert d @ d_scaled / (np.linalg.norm(d) * np.linalg.norm(d_scaled)) > 1 - 1e-6
        assert relative_error(d_scaled, d) < 1e-3


def test_db_mtl_state_and_reported_weights():
    inputs = step_inputs(6, 3)
    tx = aggregation.get("db_mtl", num_objectives=3, beta=0.9)
    state = tx.init(params_like(to_tree(inputs[0][0])))
    assert [b.shape for b in state.buffers] == [(3, 3, 4), (3, 5)]
    assert state.weights.dtype == jnp.float32 and int(state.count) == 0
    previous = np.zeros((3, 17))
    for step, (d, state) in enumerate(run_steps("db_mtl", inputs), start=1):
        assert int(state.count) == step and state.weights.shape == (3,)
        buffers = np.concatenate([np.asarray(b).reshape(3, -1) for b in state.buffers], 1)
        rows, losses = inputs[step - 1]
        weights = np.asarray(state.weights, np.float64)
        alpha = weights / ((1 - 0.9) / (losses + 1e-8))
        # d = sum_k weights_k g_k + 0.9 sum_k alpha_k h_k(previous); exact on the first step.
        expected = weights @ rows + 0.9 * alpha @ previous
        assert relative_error(d, expected) < 1e-5
        previous = buffers


# ---------------------------------------------------------------- edge cases and errors


def edge_rows(case: str, num_objectives: int) -> np.ndarray:
    return with_edge_case(step_inputs(7, num_objectives, steps=1)[0][0], case)


CASES = ["zero", "identical", "opposite", "all zero", "tiny", "huge"]


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_per_layer_edge_cases_give_finite_updates(name):
    for case in CASES:
        rows = edge_rows(case, 3)
        inputs = [(rows, np.array(losses)) for losses in ([1.0, 1.0, 1.0], [0.0, 1.0, 1e-3])]
        for d, state in run_steps(name, inputs, granularity="per_layer"):
            assert np.all(np.isfinite(d)) and np.all(np.isfinite(state.weights)), case


@pytest.mark.parametrize("name", ["gradvac", "db_mtl"])
@pytest.mark.parametrize("case", CASES)
def test_stateful_edge_cases_stay_finite_over_steps(name, case):
    rows = edge_rows(case, 3)
    inputs = [(rows, np.array([1.0, 0.5, 2.0])), (rows, np.array([0.0, 1.0, 1e-3]))] * 3
    for d, state in run_steps(name, inputs):
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))
        assert np.all(np.isfinite(d))


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("mean", {"granularity": "per_leaf"}, "aggregator.granularity='per_leaf'"),
        ("dot", {"granularity": "per_layer"}, "aggregator.granularity='per_layer'"),
        ("gradvac", {"beta": 1.5}, "aggregator.beta=1.5"),
        ("gradvac", {"beta": -0.1}, "aggregator.beta=-0.1"),
        ("gradvac", {"seed": -1}, "aggregator.seed=-1"),
        ("gradvac", {"phi": 0.1}, "aggregator.phi=0.1"),
        ("db_mtl", {"beta": 1.0}, "aggregator.beta=1.0"),
        ("db_mtl", {"beta": True}, "aggregator.beta=True"),
        ("db_mtl", {"beta_sigma": -0.5}, "aggregator.beta_sigma=-0.5"),
        ("db_mtl", {"beta_sigma": float("nan")}, "aggregator.beta_sigma=nan"),
    ],
)
def test_bad_options_raise_input_error_naming_field_and_value(name, options, field):
    with pytest.raises(InputError) as error:
        aggregation.get(name, **options)
    assert str(error.value).startswith(field)
