"""Distillation losses: Hinton KD, DKD (stable, with warm-up) and the objective vectors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mokd_jax import objectives


def numpy_dkd(student, teacher, labels, temperature):
    """DKD from its definition, float64, on moderate logits."""

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_s, p_t = softmax(student / temperature), softmax(teacher / temperature)
    rows = np.arange(len(labels))
    b_s = np.stack([p_s[rows, labels], 1 - p_s[rows, labels]], -1)
    b_t = np.stack([p_t[rows, labels], 1 - p_t[rows, labels]], -1)
    tckd = np.sum(b_t * np.log(b_t / b_s), -1).mean()
    mask = np.ones_like(p_s, bool)
    mask[rows, labels] = False
    n_s = p_s[mask].reshape(len(labels), -1)
    n_t = p_t[mask].reshape(len(labels), -1)
    n_s, n_t = n_s / n_s.sum(-1, keepdims=True), n_t / n_t.sum(-1, keepdims=True)
    nckd = np.sum(n_t * np.log(n_t / n_s), -1).mean()
    return temperature**2 * tckd, temperature**2 * nckd


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_its_definition(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 8, 5)) * 3
    labels = rng.integers(0, 5, 8)
    tckd, nckd = objectives.decoupled_kd(
        jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), labels, temperature
    )
    expected = numpy_dkd(student, teacher, labels, temperature)
    np.testing.assert_allclose([float(tckd), float(nckd)], expected, rtol=1e-4, atol=1e-6)


def test_dkd_is_finite_with_huge_logits_and_its_gradient_too():
    student = jnp.array([[1e4, -1e4, 0.0], [-3e4, 2e4, 5.0]])
    teacher = jnp.array([[-1e4, 1e4, 3.0], [0.0, 0.0, 1e4]])
    labels = jnp.array([0, 1])

    def total(logits):
        return sum(objectives.decoupled_kd(logits, teacher, labels, 4.0))

    value, gradient = jax.value_and_grad(total)(student)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(gradient)))


def test_hinton_kd_is_zero_for_equal_logits_and_positive_otherwise():
    logits = jnp.array([[1.0, 2.0, 3.0]])
    assert float(objectives.hinton_kd(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(objectives.hinton_kd(logits, logits[:, ::-1], 4.0)) > 0


def distill_config(**overrides):
    config = ml_collections.ConfigDict(
        {"temperature": 4.0, "task_weight": 1.0, "logit_weight": 1.0, "feature_weight": 0.5,
         "objectives": "merged",
         "logit_loss": "kd", "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup_steps": 10}
    )  # fmt: skip
    config.update(overrides)
    return config


def test_objective_vectors_merged_and_separate():
    rng = np.random.default_rng(1)
    logits, teacher = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    projected, target = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    labels = jnp.array([0, 1, 2, 0])
    args = (logits, teacher, labels, [(projected, target)], jnp.array(0))
    merged, parts = objectives.loss_vector(*args, distill_config())
    separate, _ = objectives.loss_vector(*args, distill_config(objectives="separate"))
    assert merged.shape == (2,) and separate.shape == (3,)
    np.testing.assert_allclose(
        float(merged[1]), float(parts["kd_logit"] + 0.5 * parts["kd_feature"]), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(separate[1:]).sum(), float(merged[1]), rtol=1e-6)
    np.testing.assert_allclose(float(merged[0]), float(parts["cross_entropy"]), rtol=1e-6)


@pytest.mark.parametrize("objectives_kind", ["merged", "separate"])
def test_task_and_logit_weights_scale_their_objectives_and_leave_the_parts_raw(objectives_kind):
    """KD's CE 0.1 / KD 0.9: the loss vector carries the weights, the logged parts do not."""
    rng = np.random.default_rng(3)
    logits, teacher = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    projected, target = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    args = (logits, teacher, jnp.array([0, 1, 2, 0]), [(projected, target)], jnp.array(0))
    unit, parts = objectives.loss_vector(*args, distill_config(objectives=objectives_kind))
    weighted, weighted_parts = objectives.loss_vector(
        *args, distill_config(objectives=objectives_kind, task_weight=0.1, logit_weight=0.9)
    )
    np.testing.assert_allclose(float(weighted[0]), 0.1 * float(unit[0]), rtol=1e-6)
    logit_row = float(weighted[1]) - (
        0.5 * float(parts["kd_feature"]) if objectives_kind == "merged" else 0.0
    )
    np.testing.assert_allclose(logit_row, 0.9 * float(parts["kd_logit"]), rtol=1e-5)
    for name in parts:
        np.testing.assert_allclose(float(weighted_parts[name]), float(parts[name]), rtol=1e-6)


def test_dkd_warms_up_linearly():
    rng = np.random.default_rng(2)
    logits, teacher = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    labels = jnp.array([0, 1, 2, 0])
    config = distill_config(logit_loss="dkd")
    values = [
        float(objectives.logit_distillation(logits, teacher, labels, jnp.array(step), config))
        for step in (0, 4, 9, 50)
    ]
    np.testing.assert_allclose(values[0] * 5, values[1], rtol=1e-5)
    np.testing.assert_allclose(values[2], values[3], rtol=1e-6)
