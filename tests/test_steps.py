"""The pure steps on a real digits batch: what a distillation step updates, the teacher as
an argument, every registered aggregator through the trainer's own step, the
representation path, each network's input statistics, and the step's purity (no I/O
library imported)."""

import functools
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mokd_jax import aggregation, data, networks, objectives, optimizers, state, steps, subspace
from mokd_jax.normalization import UNIT, Normalization


class StepParts(NamedTuple):
    """A tiny batch and everything a distillation step needs, from the smoke config."""

    images: np.ndarray
    labels: np.ndarray
    networks: networks.Networks
    tx: object
    create_state: functools.partial  # key -> a fresh student TrainState


@functools.cache
def digits():
    """The bundled digits, loaded once per session."""
    return data.load("digits")


def step_parts(config) -> StepParts:
    dataset = digits()
    images, labels = dataset.train_images[:16], dataset.train_labels[:16]
    nets = networks.build_networks(
        config, dataset.num_classes, images.shape[1], teacher_input=UNIT, student_input=UNIT
    )
    tx = optimizers.student_optimizer(config)
    create_state = functools.partial(state.create_student_state, nets, images.shape[1:], tx)
    return StepParts(images, labels, nets, tx, create_state)


_PARTS_AND_STEPS: dict[str, tuple[StepParts, object]] = {}


def parts_and_step(config) -> tuple[StepParts, object]:
    """The step parts and the jitted distillation step of `config`, shared by every test of
    the session on an equal config (keyed by its JSON): one trace and one compilation, most
    of such a test's time, instead of one per test."""
    key = config.to_json_best_effort(sort_keys=True)
    if key not in _PARTS_AND_STEPS:
        parts = step_parts(config)
        step = jax.jit(steps.make_distill_step(config, parts.networks, parts.tx))
        _PARTS_AND_STEPS[key] = parts, step
    return _PARTS_AND_STEPS[key]


@functools.cache
def _teacher_variables(teacher, image_shape: tuple[int, ...], seed: int) -> dict:
    """Computed concretely even when first asked for inside a trace (a jitted forward), so
    that the cache never keeps a tracer."""
    with jax.ensure_compile_time_eval():
        return state.init_model(teacher, image_shape, jax.random.key(seed))


def teacher_variables_for(parts: StepParts, seed: int = 1) -> dict:
    """Fresh teacher variables (initialised once per network, shape and seed)."""
    return _teacher_variables(parts.networks.teacher, parts.images.shape[1:], seed)


def run_one_step(config):
    """(state before, state after, metrics) of one jitted distillation step."""
    parts, step = parts_and_step(config)
    before = parts.create_state(jax.random.key(2))
    after, metrics = step(before, teacher_variables_for(parts), parts.images, parts.labels)
    return before, after, metrics


def changed(before, after) -> bool:
    return any(
        not np.array_equal(b, a)
        for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


def moving_smoke_config():
    """The smoke config with a non-zero learning rate on the first step (no warm-up): the
    config of the mokd step that several tests share (`parts_and_step`)."""
    config = default.get_config("smoke")
    config.student.warmup_steps = 0
    return config


def test_distill_step_updates_student_and_projector_only():
    parts, step = parts_and_step(moving_smoke_config())
    teacher_variables = teacher_variables_for(parts)
    before = parts.create_state(jax.random.key(2))
    teacher_before = jax.tree.map(np.array, teacher_variables)
    after, metrics = step(before, teacher_variables, parts.images, parts.labels)

    assert int(after.step) == 1
    for part in ("student", "projector"):
        assert changed(before.params[part], after.params[part]), part
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.device_get(teacher_variables))
    jax.tree.map(np.testing.assert_array_equal, after.constants, before.constants)
    expected = {
        "loss_task", "loss_distill", "loss_kd_logit", "loss_kd_feature", "weight_task",
        "weight_distill", "cos_task_distill", "norm_ratio_distill", "accuracy", "conflict",
    }  # fmt: skip
    assert expected <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert -1.0 <= float(metrics["cos_task_distill"]) <= 1.0
    assert float(metrics["norm_ratio_distill"]) > 0


def test_teacher_is_an_argument_of_the_step_not_a_constant():
    """Different teacher variables through the same compiled step give different updates."""
    parts, step = parts_and_step(moving_smoke_config())
    losses = [
        float(step(parts.create_state(jax.random.key(0)), teacher_variables_for(parts, seed),
                   parts.images, parts.labels)[1]["loss_distill"])
        for seed in (1, 2)
    ]  # fmt: skip
    assert step._cache_size() == 1
    assert losses[0] != losses[1]


@pytest.mark.parametrize("name", aggregation.NAMES)
def test_every_registered_aggregator_runs_through_the_trainers_step(name):
    """One jitted step of the trainer's own distillation step per registered method (the
    contract decides the backward pass): the student moves, every metric is finite, the
    weights are logged, and the conflict diagnostics exist exactly for the methods given
    the per-objective gradients."""
    config = moving_smoke_config()
    config.aggregator = name
    if aggregation.spec(name).owns_momentum:
        config.student.optimizer = "sgd"
    before, after, metrics = run_one_step(config)
    assert changed(before.params["student"], after.params["student"])
    assert all(np.isfinite(float(value)) for value in metrics.values()), metrics
    assert {"weight_task", "weight_distill"} <= set(metrics)
    per_objective = aggregation.spec(name).drive == aggregation.PER_OBJECTIVE
    assert ("cos_task_distill" in metrics) == per_objective


@pytest.mark.slow
def test_three_objectives_with_dkd_log_every_objective():
    config = default.get_config("smoke")
    config.distill.objectives, config.distill.logit_loss = "separate", "dkd"
    _, _, metrics = run_one_step(config)
    assert {"weight_logit", "weight_feature", "cos_task_logit", "cos_task_feature"} <= set(metrics)
    assert all(np.isfinite(float(value)) for value in metrics.values())


class RepresentationPath(NamedTuple):
    """The student's functions of one smoke step and its parameters, with the jitted
    `representation_gradients` rows (params, keep) -> [K]-row gradients, whose combination
    keeps `keep` x everything at the pooled features: `keep` is traced, so keeping
    everything (1) and nothing (0) share one compilation."""

    encode: object
    head_objectives: object
    params: dict
    rows: object


@functools.cache
def representation_path(tap_set: str) -> RepresentationPath:
    config = default.get_config("smoke")
    config.projector.taps = tap_set
    parts = step_parts(config)
    student_state = parts.create_state(jax.random.key(2))
    encode, head_objectives = steps.student_functions(
        student_state, teacher_variables_for(parts), parts.images, parts.labels,
        networks=parts.networks, distill=config.distill,
    )  # fmt: skip

    def rows(params, keep):
        combine = lambda g: (keep * g.sum(0), keep * jnp.ones(2))  # noqa: E731
        return steps.representation_gradients(encode, head_objectives, params, combine)[0]

    return RepresentationPath(encode, head_objectives, student_state.params, jax.jit(rows))


def test_representation_path_with_everything_kept_equals_the_plain_sum():
    """GradDrop's two pullbacks (head, then encoder with the combined representation
    gradient and the other taps' gradients) reproduce the one-pullback gradient of the
    summed losses when nothing is dropped: the plumbing of `representation_gradients` is
    exact, the second tap of the default multi-scale set included."""
    path = representation_path("multi_scale")

    def summed(params):
        student_taps, _ = path.encode(params["student"])
        return path.head_objectives(params, student_taps)[0].sum()

    rows = path.rows(path.params, 1.0)
    expected = jax.jit(jax.grad(summed))(path.params)
    jax.tree.map(
        lambda row, want: np.testing.assert_allclose(row[0], want, rtol=2e-4, atol=1e-6),
        rows, expected,
    )  # fmt: skip


def encoder_gradients_with_the_representation_dropped(tap_set: str) -> dict:
    """The student's gradient from `representation_gradients` when the combination keeps
    nothing at the pooled features."""
    path = representation_path(tap_set)
    return path.rows(path.params, 0.0)["student"]


@pytest.mark.slow  # the pooled-only step compiled (the multi-scale one is shared)
def test_the_other_taps_reach_the_encoder_past_the_representation():
    """GradDrop's representation is the pooled features; with several taps, the second
    tap's feature loss reaches the encoder through the ordinary pullback, so the first stage
    still learns when everything is dropped at the representation, and only then."""
    first_stage = lambda gradient: jax.tree.leaves(gradient["stages_0_0"])  # noqa: E731
    multi_scale = encoder_gradients_with_the_representation_dropped("multi_scale")
    pooled_only = encoder_gradients_with_the_representation_dropped("pooled")
    assert max(float(jnp.abs(leaf).max()) for leaf in first_stage(multi_scale)) > 1e-6
    assert all(not np.any(np.asarray(leaf)) for leaf in first_stage(pooled_only))


@pytest.mark.slow  # the trainer's step compiled with orthogonal lifts (about 10 s)
def test_orthogonal_student_lifts_stay_orthogonal_through_the_trainers_steps():
    """Three trainer steps with `projector.orthogonal`: every tap's lift has moved and its
    map still has orthonormal rows (cnn_small's taps, 48 and 32 wide, into 192 and 128)."""
    config = moving_smoke_config()
    config.projector.orthogonal = True
    parts, step = parts_and_step(config)
    before = parts.create_state(jax.random.key(2))
    after = before
    for _ in range(3):
        after, _ = step(after, teacher_variables_for(parts), parts.images, parts.labels)
    for name, tap in after.params["projector"].items():
        kernel = tap["lift_student"]["kernel"]
        lift = (
            subspace.OrthogonalDense(kernel.shape[1]).apply(
                {"params": tap["lift_student"]}, jnp.eye(kernel.shape[0])
            )
            - tap["lift_student"]["bias"]
        )
        np.testing.assert_allclose(lift @ lift.T, np.eye(kernel.shape[0]), atol=1e-5)
        assert changed(before.params["projector"][name], tap), name


@pytest.mark.slow
def test_the_steps_import_no_io_library():
    """The step API stays importable where TensorFlow, CLU and Orbax are not installed."""
    modules = "mokd_jax.steps, mokd_jax.state, mokd_jax.optimizers, mokd_jax.networks"
    code = (
        f"import sys, {modules}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'clu', 'orbax', 'tensorflow_datasets')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


DARK = Normalization(mean=(0.2,), std=(0.1,))


def forward(parts: StepParts, teacher_input, student_input):
    """The distillation step's forward pass (`steps.student_functions`, which
    `distill_step` differentiates) with each network fed through the given statistics:
    (task loss, KD logit loss, student logits). The statistics are pure jnp inputs
    (`normalization.apply`), so a jitted `forward` takes them as traced arguments: one
    compilation serves every pair."""
    config = default.get_config("smoke")
    nets = parts.networks._replace(teacher_input=teacher_input, student_input=student_input)
    student_state = parts.create_state(jax.random.key(2))
    encode, head_objectives = steps.student_functions(
        student_state, teacher_variables_for(parts), parts.images, parts.labels,
        networks=nets, distill=config.distill,
    )  # fmt: skip
    losses, (loss_parts, _, _) = steps.joined_objectives(encode, head_objectives)(
        student_state.params
    )
    pooled = encode(student_state.params["student"])[0][0]
    logits = nets.student.apply(
        {"params": student_state.params["student"]}, pooled, method="classify"
    )
    return losses[0], loss_parts["kd_logit"], logits


def test_each_network_in_the_distill_step_sees_its_own_input_statistics():
    """The task loss follows the student's statistics only; the KD loss both networks'; and
    the KD loss is that of the teacher's logits on its own statistics (predicted apart)."""
    parts = step_parts(default.get_config("smoke"))
    jitted_forward = jax.jit(functools.partial(forward, parts))
    task, kd, _ = jitted_forward(UNIT, UNIT)
    dark_teacher_task, dark_teacher_kd, student_logits = jitted_forward(DARK, UNIT)
    dark_student_task, dark_student_kd, _ = jitted_forward(UNIT, DARK)
    assert jitted_forward._cache_size() == 1
    assert dark_teacher_task == task and dark_student_task != task
    assert dark_teacher_kd != kd and dark_student_kd != kd

    def kd_from(teacher_input):
        teacher_logits = steps.predict(
            teacher_variables_for(parts), parts.images,
            model=parts.networks.teacher, inputs=teacher_input,
        )  # fmt: skip
        temperature = default.get_config("smoke").distill.temperature
        return float(objectives.hinton_kd(student_logits, teacher_logits, temperature))

    np.testing.assert_allclose(float(dark_teacher_kd), kd_from(DARK), rtol=1e-5)
    assert abs(dark_teacher_kd - kd_from(UNIT)) > 1e-3 * abs(dark_teacher_kd)
