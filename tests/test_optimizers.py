"""mokd_jax.optimizers: the schedules and the student's chain (aggregator, optimizer), with
a method that owns its momenta (dot) driven by its contract, not by its name; the weight
decay masks."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mokd_jax import aggregation, models, optimizers


def student_params():
    return {"student": {"w": jnp.arange(1.0, 5.0)}, "projector": {"p": jnp.ones(3)}}


def stacked(tree, rows):
    """Per-objective gradients: every leaf repeated with leading axis K = len(rows)."""
    return jax.tree.map(lambda leaf: jnp.stack([r * jnp.ones_like(leaf) for r in rows]), tree)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    section = default.get_config().student
    section.learning_rate, section.num_train_steps, section.warmup_steps = 0.2, 100, 10
    schedule = optimizers.learning_rate_schedule(section)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, 5, 10, 100)], [0.0, 0.1, 0.2, 0.0], atol=1e-7
    )


def test_warmup_is_capped_below_the_run_length():
    section = default.get_config().student
    section.learning_rate, section.num_train_steps, section.warmup_steps = 0.2, 4, 50
    schedule = optimizers.learning_rate_schedule(section)
    assert float(schedule(3)) == pytest.approx(0.2)


def test_sgd_applies_coupled_weight_decay_and_momentum():
    section = default.get_config().student
    section.optimizer, section.weight_decay, section.learning_rate = "sgd", 0.5, 0.1
    section.warmup_steps, section.schedule, section.decay_boundaries = 0, "step", ()
    tx = optimizers.make_optimizer(section)
    params = {"w": jnp.array([2.0])}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([1.0])}, state, params)
    np.testing.assert_allclose(updates["w"], [-0.1 * (1.0 + 0.5 * 2.0)], rtol=1e-6)
    updates, _ = tx.update({"w": jnp.array([1.0])}, state, params)
    np.testing.assert_allclose(updates["w"], [-0.1 * (0.9 * 2.0 + 2.0)], rtol=1e-6)


def test_student_chain_puts_the_aggregator_first_and_sums_the_projector_rows():
    config = default.get_config()
    config.aggregator = "mokd"
    tx = optimizers.student_optimizer(config)
    params = student_params()
    state = tx.init(params)
    assert aggregation.find_state(state) is state[0]  # the aggregator comes first
    _, state = tx.update(stacked(params, [1.0, 2.0]), state, params, losses=jnp.ones(2))
    assert float(aggregation.weights(state).sum()) > 0


def test_frozen_parameters_have_no_say_in_the_weights_and_get_no_update():
    """With `trainable`, MoKD's weights come from the trainable leaves' gradients alone: the
    same as for a student made of those leaves only, however the frozen leaf's rows
    conflict; the frozen leaf's update is zero."""
    config = default.get_config()
    config.aggregator = "mokd"
    config.student.warmup_steps = 0  # a nonzero rate at step 0
    params = {
        "student": {"frozen": jnp.ones(3), "trained": jnp.ones(2)},
        "projector": {"p": jnp.ones(3)},
    }
    rows = {
        "student": {
            "frozen": jnp.array([[50.0, 0.0, 0.0], [-50.0, 1.0, 0.0]]),
            "trained": jnp.array([[1.0, 0.0], [0.0, 3.0]]),
        },
        "projector": {"p": jnp.ones((2, 3))},
    }

    def trainable(params):
        return {
            "student": {"frozen": False, "trained": True},
            "projector": jax.tree.map(lambda _: True, params["projector"]),
        }

    def weights_and_updates(tx, params, rows):
        updates, state = tx.update(rows, tx.init(params), params, losses=jnp.ones(2))
        return aggregation.weights(state), updates

    weights, updates = weights_and_updates(
        optimizers.student_optimizer(config, trainable), params, rows
    )
    alone = {"student": {"trained": params["student"]["trained"]}, "projector": {}}
    alone_rows = {"student": {"trained": rows["student"]["trained"]}, "projector": {}}
    expected, _ = weights_and_updates(optimizers.student_optimizer(config), alone, alone_rows)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    np.testing.assert_array_equal(updates["student"]["frozen"], jnp.zeros(3))
    assert float(jnp.abs(updates["student"]["trained"]).sum()) > 0
    everything, _ = weights_and_updates(optimizers.student_optimizer(config), params, rows)
    assert not np.allclose(everything, expected, rtol=1e-2)  # the frozen rows would count


def test_a_method_that_owns_its_momenta_gets_plain_sgd_and_the_students_weight_decay():
    """dot: its own momenta and weight decay, followed by SGD without momentum; the first
    update of zero gradients is then exactly -lr * weight_decay * params."""
    config = default.get_config()
    config.aggregator, config.student.optimizer = "dot", "sgd"
    config.student.weight_decay, config.student.learning_rate = 0.5, 0.1
    config.student.warmup_steps, config.student.schedule = 0, "step"
    assert aggregation.spec("dot").owns_momentum
    assert "weight_decay" not in config.aggregation.dot
    tx = optimizers.student_optimizer(config)
    params = student_params()
    updates, _ = tx.update(stacked(params, [0.0, 0.0]), tx.init(params), params, losses=jnp.ones(2))
    np.testing.assert_allclose(
        updates["student"]["w"], -0.1 * 0.5 * params["student"]["w"], rtol=1e-6
    )


def test_aggregator_hyperparameters_come_from_its_own_section():
    config = default.get_config()
    config.aggregator = "mokd"
    config.aggregation.mokd.max_norm = 0.25
    assert optimizers.aggregator_hparams(config)["max_norm"] == 0.25
    config.aggregator = "mean"
    assert optimizers.aggregator_hparams(config) == {}


def test_sum_aggregator_then_adamw_equals_adamw_on_the_summed_gradient():
    config = default.get_config()
    config.aggregator = "sum"
    tx = optimizers.student_optimizer(config)
    reference = optimizers.make_optimizer(config.student)
    params = student_params()
    grads = stacked(params, [0.5, 1.5])
    ours, _ = tx.update(grads, tx.init(params), params, losses=jnp.ones(2))
    summed = jax.tree.map(lambda leaf: leaf.sum(0), grads)
    theirs, _ = reference.update(summed, reference.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


def test_step_schedule_decays_at_its_boundaries_after_warmup():
    section = default.get_config().student
    section.learning_rate, section.num_train_steps, section.warmup_steps = 0.4, 100, 10
    section.schedule, section.decay_boundaries = "step", (50, 80)
    schedule = optimizers.learning_rate_schedule(section)
    rates = [float(schedule(step)) for step in (0, 5, 10, 49, 50, 79, 80, 99)]
    np.testing.assert_allclose(rates, [0, 0.2, 0.4, 0.4, 0.04, 0.04, 0.004, 0.004], rtol=1e-6)


@pytest.fixture(scope="module")
def vit_params():
    """A tiny ViT's parameters, every kind of leaf timm's rule sorts, all ones: the masks
    read only the tree, and the decay test only needs nonzero values, so the init is traced
    for its shapes (`jax.eval_shape`) and never computed."""
    model = models.get("vit_tiny", 5, image_size=16).clone(depth=1, patch_size=8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    return jax.tree.map(lambda leaf: jnp.ones(leaf.shape, leaf.dtype), shapes)


def test_timm_mask_spares_biases_norms_pos_embed_and_cls_token(vit_params):
    mask = flax.traverse_util.flatten_dict(optimizers.timm_decay_mask(vit_params), sep="/")
    spared = sorted(path for path, decayed in mask.items() if not decayed)
    assert sorted(path for path, decayed in mask.items() if decayed) == [
        "blocks_0/attn/proj/kernel",
        "blocks_0/attn/qkv/kernel",
        "blocks_0/mlp/fc1/kernel",
        "blocks_0/mlp/fc2/kernel",
        "head/kernel",
        "patch_embed/proj/kernel",
    ]
    assert {"cls_token", "pos_embed", "norm/scale", "norm/bias", "blocks_0/norm1/scale"} <= set(
        spared
    )
    assert all(path.endswith(("bias", "scale", "token", "embed")) for path in spared)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_timm_mask_leaves_the_spared_parameters_undecayed(optimizer, vit_params):
    """Zero gradients: only weight decay moves a parameter, so exactly the decayed ones
    move (and with 'all', every one: all are made nonzero)."""
    params = jax.tree.map(lambda leaf: leaf + 1.0, vit_params)
    section = default.get_config().student
    section.optimizer, section.weight_decay, section.warmup_steps = optimizer, 0.05, 0
    moved = {}
    for mask in optimizers.WEIGHT_DECAY_MASKS:
        section.weight_decay_mask = mask
        tx = optimizers.make_optimizer(section)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        moved[mask] = jax.tree.map(lambda update: bool(jnp.any(update != 0)), updates)
    assert all(jax.tree.leaves(moved["all"]))
    assert moved["timm"] == optimizers.timm_decay_mask(params)
