"""The methods that change the step itself: famo, mokd_amortized (one backward) and dot
(separate momenta), against float64 numpy references written from docs/aggregators.md."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mokd_jax import aggregation
from mokd_jax.aggregation import graddrop
from mokd_jax.errors import InputError

EPS = 1e-8


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


class NumpyFamo:
    """FAMO from the formulas: weights z / (c L), xi by Adam (L2 decay) on J_softmax^T delta."""

    def __init__(self, num_objectives, learning_rate=0.025, weight_decay=1e-3, rescale=False):
        self.xi = np.zeros(num_objectives)
        self.m = np.zeros(num_objectives)
        self.v = np.zeros(num_objectives)
        self.t = 0
        self.previous = None
        self.lr, self.wd, self.rescale = learning_rate, weight_decay, rescale

    def weights(self, losses):
        z = softmax(self.xi)
        if self.rescale:  # mokd_amortized: z / L times sum z L
            return z / (losses + EPS) * np.sum(z * losses)
        inverse = 1.0 / (losses + EPS)
        return z * inverse / np.sum(z * inverse)

    def observe(self, losses):
        log_losses = np.log(losses + EPS)
        if self.previous is not None:
            delta = self.previous - log_losses
            z = softmax(self.xi)
            gradient = (np.diag(z) - np.outer(z, z)) @ delta + self.wd * self.xi
            self.t += 1
            self.m = 0.9 * self.m + 0.1 * gradient
            self.v = 0.999 * self.v + 0.001 * gradient**2
            m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
            self.xi = self.xi - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        self.previous = log_losses


@pytest.mark.parametrize("name", ["famo", "mokd_amortized"])
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_one_backward_methods_match_reference_over_steps(name, num_objectives):
    rng = np.random.default_rng(num_objectives)
    tx = aggregation.get(
        name,
        num_objectives=num_objectives,
        **({"max_norm": None} if name == "mokd_amortized" else {}),
    )
    reference = NumpyFamo(num_objectives, rescale=name == "mokd_amortized")
    state = tx.init(None)
    update = jax.jit(tx.update)
    for _ in range(6):
        losses = rng.uniform(0.05, 3.0, num_objectives)
        rows = np.asarray(
            aggregation.backward_rows(
                aggregation.spec(name), state, jnp.asarray(losses, jnp.float32)
            )
        )
        np.testing.assert_allclose(rows[0], reference.weights(losses), rtol=1e-5)
        gradient = rng.normal(size=(1, 7)).astype(np.float32)
        out, state = update(
            {"w": jnp.asarray(gradient)}, state, losses=jnp.asarray(losses, jnp.float32)
        )
        np.testing.assert_array_equal(np.asarray(out["w"]), gradient[0])
        np.testing.assert_allclose(np.asarray(state.weights), reference.weights(losses), rtol=1e-5)
        reference.observe(losses)
        np.testing.assert_allclose(np.asarray(state.logits), reference.xi, rtol=1e-4, atol=1e-7)


def test_famo_moves_weight_to_the_objective_that_improves_least():
    tx = aggregation.get("famo")
    state = tx.init(None)
    gradient = {"w": jnp.ones((1, 3))}
    for step in range(20):  # objective 0 falls fast, objective 1 stays flat
        losses = jnp.array([2.0 * 0.8**step, 1.0])
        _, state = tx.update(gradient, state, losses=losses)
    z = jax.nn.softmax(state.logits)
    assert float(z[1]) > 0.6


def test_mokd_amortized_clips_the_shared_gradient_only():
    tx = aggregation.get("mokd_amortized", shared={"shared": True, "head": False}, max_norm=1.0)
    gradient = {"shared": jnp.full((1, 4), 10.0), "head": jnp.full((1, 2), 10.0)}
    out, _ = tx.update(gradient, tx.init(None), losses=jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(float(jnp.linalg.norm(out["shared"])), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["head"]), np.full(2, 10.0))


def test_backward_rows_are_the_identity_for_jacobian_methods():
    tx = aggregation.get("mokd", num_objectives=3)
    rows = aggregation.backward_rows(
        aggregation.spec("mokd"), tx.init(None), jnp.array([1.0, 2.0, 3.0])
    )
    np.testing.assert_array_equal(np.asarray(rows), np.eye(3))


@pytest.mark.parametrize("name", ["famo", "mokd_amortized"])
@pytest.mark.parametrize("losses", [[0.0, 1.0], [1e-20, 1e20], [0.0, 0.0]])
def test_one_backward_methods_stay_finite(name, losses):
    tx = aggregation.get(name)
    state = tx.init(None)
    for _ in range(3):
        rows = aggregation.backward_rows(
            aggregation.spec(name), state, jnp.array(losses, jnp.float32)
        )
        out, state = tx.update({"w": jnp.ones((1, 3))}, state, losses=jnp.array(losses))
        assert np.all(np.isfinite(np.asarray(rows)))
        assert np.all(np.isfinite(np.asarray(out["w"])))
        assert np.all(np.isfinite(np.asarray(state.logits)))


def numpy_dot(gradients, params, shared, momentum=0.9, delta=0.075, weight_decay=1e-2):
    """DOT over a sequence of (task, distill) gradients; yields each step's update."""
    task_buffer = distill_buffer = None
    for task, distill in gradients:
        task_gradient = task + weight_decay * params
        if shared:
            task_buffer = (
                task_gradient
                if task_buffer is None
                else (momentum - delta) * task_buffer + task_gradient
            )
            distill_buffer = (
                distill if distill_buffer is None else (momentum + delta) * distill_buffer + distill
            )
            yield task_buffer + distill_buffer
        else:
            merged = task_gradient + distill
            task_buffer = merged if task_buffer is None else momentum * task_buffer + merged
            yield task_buffer


def test_dot_matches_reference_with_separate_and_merged_momenta():
    rng = np.random.default_rng(0)
    params = {"body": rng.normal(size=5), "projector": rng.normal(size=3)}
    steps = [{k: rng.normal(size=(2, v.size)) for k, v in params.items()} for _ in range(5)]
    tx = aggregation.get("dot", shared={"body": True, "projector": False}, weight_decay=1e-2)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    update = jax.jit(tx.update)
    expected = {
        key: list(numpy_dot([s[key] for s in steps], params[key], shared=key == "body"))
        for key in params
    }
    for i, stacked in enumerate(steps):
        out, state = update(
            jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stacked),
            state,
            jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params),
        )
        for key in params:
            np.testing.assert_allclose(np.asarray(out[key]), expected[key][i], rtol=1e-5, atol=1e-6)


def test_dot_chains_with_plain_sgd_and_checks_its_hyperparameters():
    tx = optax.chain(aggregation.get("dot"), optax.sgd(0.1))
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params, losses=jnp.ones(2))
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.2 * np.ones(3), rtol=1e-6)
    with pytest.raises(InputError, match="aggregator.num_objectives=3"):
        aggregation.get("dot", num_objectives=3)
    with pytest.raises(InputError, match="aggregator.delta=0.5"):
        aggregation.get("dot", delta=0.5)


# ---------------------------------------------------------------- graddrop


def numpy_graddrop(gradients, uniform, leak=0.0):
    """GradDrop from docs/aggregators.md, float64, with the batch summed for the masks."""
    summed = gradients.sum(axis=1)
    purity = 0.5 * (1 + summed.sum(0) / (np.abs(summed).sum(0) + 1e-8))
    mask = ((purity > uniform) & (summed > 0)) | ((purity < uniform) & (summed < 0))
    keep = leak + (1 - leak) * mask
    return np.sum(keep[:, None] * gradients, axis=0)


def graddrop_uniform(state, shape):
    """The U that `combine_representation` draws from this state."""
    key, _ = graddrop.step_keys(state.key)
    return np.asarray(jax.random.uniform(key, shape), np.float64)


@pytest.mark.parametrize("num_objectives", [2, 3])
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_matches_reference(num_objectives, leak):
    rng = np.random.default_rng(num_objectives)
    gradients = rng.normal(size=(num_objectives, 4, 6)).astype(np.float32)
    state = aggregation.get("graddrop", num_objectives=num_objectives, leak=leak).init(None)
    combined, kept = jax.jit(graddrop.combine_representation)(state, jnp.asarray(gradients))
    expected = numpy_graddrop(gradients.astype(np.float64), graddrop_uniform(state, (6,)), leak)
    np.testing.assert_allclose(np.asarray(combined), expected, rtol=1e-5, atol=1e-6)
    assert kept.shape == (num_objectives,)


def test_graddrop_keeps_one_sign_per_feature_and_agreeing_gradients_whole():
    rng = np.random.default_rng(5)
    gradients = jnp.asarray(rng.normal(size=(3, 8, 16)), jnp.float32)
    state = aggregation.get("graddrop", num_objectives=3).init(None)
    combined, _ = graddrop.combine_representation(state, gradients)
    uniform = graddrop_uniform(state, (16,))
    summed = np.asarray(gradients, np.float64).sum(1)
    purity = 0.5 * (1 + summed.sum(0) / np.abs(summed).sum(0))
    kept_sign = np.where(purity > uniform, 1.0, -1.0)
    for feature in range(16):  # every kept batch-summed gradient has the chosen sign
        kept = [s for s in summed[:, feature] if np.sign(s) == kept_sign[feature]]
        np.testing.assert_allclose(
            np.asarray(combined, np.float64).sum(0)[feature], np.sum(kept), rtol=1e-4, atol=1e-5
        )
    agreeing = jnp.abs(gradients)  # all positive: purity 1, nothing is dropped
    combined, kept = graddrop.combine_representation(state, agreeing)
    np.testing.assert_allclose(np.asarray(combined), np.asarray(agreeing.sum(0)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(kept), np.ones(3))


def test_graddrop_update_passes_the_gradient_on_and_advances_its_key():
    tx = aggregation.get("graddrop", seed=3)
    state = tx.init(None)
    out, new_state = tx.update({"w": jnp.ones((1, 4))}, state, losses=jnp.ones(2), kept=jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.ones(4))
    assert not np.array_equal(np.asarray(state.key), np.asarray(new_state.key))
    np.testing.assert_array_equal(np.asarray(tx.init(None).key), np.asarray(state.key))
    with pytest.raises(InputError, match="aggregator.leak=2"):
        aggregation.get("graddrop", leak=2)


def test_graddrop_never_carries_on_a_key_it_drew_from():
    tx = aggregation.get("graddrop", seed=3)
    state = tx.init(None)
    drawn, carried = [], [np.asarray(state.key)]
    for _ in range(4):
        drawn.append(np.asarray(jax.random.key_data(graddrop.step_keys(state.key)[0])))
        _, state = tx.update({"w": jnp.ones((1, 4))}, state, losses=jnp.ones(2), kept=jnp.ones(2))
        carried.append(np.asarray(state.key))
    keys = {key.tobytes() for key in drawn + carried}
    assert len(keys) == len(drawn) + len(carried)  # every draw's key is fresh, none carried
