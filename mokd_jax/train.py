"""Teacher training, MoKD distillation and evaluation, top to bottom.

The data flow of one distillation step (DESIGN.md):
    batch -> teacher forward (eval mode, its variables passed in as an argument)
          -> student forward + projector (one forward pass)
          -> losses [task, distill]
          -> per-objective gradients J: the pullback of each unit row, leading axis K
          -> optax.chain(aggregator, optimizer) turns J into one update
          -> new state; metrics (losses, cos(g_task, g_distill), norm ratio, weights)

`train_and_evaluate(config, workdir)` runs the three phases: (1) train the teacher with
cross-entropy, or restore it; (2) distill the student; (3) evaluate both and write
WORKDIR/summary.json. Both phases checkpoint periodically and resume from the workdir.
"""

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import struct

from mokd_jax import aggregation, checkpoint, data, models, parallel, plots
from mokd_jax.aggregation.gram import conflict_diagnostics, gram_matrix
from mokd_jax.data.mixing import mixup_cutmix
from mokd_jax.errors import invalid
from mokd_jax.objectives import (
    LOGIT_LOSSES,
    OBJECTIVES,
    cross_entropy,
    hard_labels,
    loss_vector,
)
from mokd_jax.subspace import SubspaceProjector

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")

PREEMPTION = threading.Event()
"""Set by the SIGTERM handler of `mokd_jax.main`: the loop then saves and stops."""


class Preempted(Exception):
    """Training stopped early on a preemption notice, after saving a checkpoint."""

    def __init__(self, phase: str, step: int):
        super().__init__(f"{phase} preempted at step {step}; its checkpoint is saved")
        self.phase = phase
        self.step = step


class TrainState(struct.PyTreeNode):
    """Everything a step changes. `params` are the differentiated variables; for the
    student they are {'student': ..., 'projector': ...}. `constants` holds non-trainable
    variables (the projector's fixed teacher lift)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    constants: Any
    opt_state: optax.OptState


# ----------------------------------------------------------------------------- config checks


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises InputError for a numeric or named field outside what is allowed."""
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps"):
        if config[field] < 1:
            raise invalid(field, config[field], "a positive integer")
    for section in ("teacher", "student"):
        for field in ("num_train_steps", "learning_rate"):
            if config[section][field] <= 0:
                raise invalid(f"{section}.{field}", config[section][field], "a positive number")
        if config[section].optimizer not in OPTIMIZERS:
            raise invalid(f"{section}.optimizer", config[section].optimizer, f"one of {OPTIMIZERS}")
        check_schedule(f"{section}", config[section])
    for field in ("mixup_alpha", "cutmix_alpha"):
        if config.augment[field] < 0:
            raise invalid(f"augment.{field}", config.augment[field], "a number >= 0 (0: off)")
    if not 0 <= config.augment.label_smoothing < 1:
        raise invalid("augment.label_smoothing", config.augment.label_smoothing, "0 <= value < 1")
    if config.dtype not in models.DTYPES:
        raise invalid("dtype", config.dtype, f"one of {models.DTYPES}")
    if config.mesh.fsdp_min_size < 0:
        raise invalid("mesh.fsdp_min_size", config.mesh.fsdp_min_size, "a count >= 0")
    if config.distill.objectives not in OBJECTIVES:
        raise invalid(
            "distill.objectives", config.distill.objectives, f"one of {tuple(OBJECTIVES)}"
        )
    if config.distill.logit_loss not in LOGIT_LOSSES:
        raise invalid("distill.logit_loss", config.distill.logit_loss, f"one of {LOGIT_LOSSES}")
    if config.aggregator == "dot" and config.student.optimizer != "sgd":
        raise invalid("student.optimizer", config.student.optimizer, "sgd with aggregator=dot")
    if config.distill.temperature <= 0:
        raise invalid("distill.temperature", config.distill.temperature, "a positive number")
    if config.projector.width_multiplier < 1:
        raise invalid("projector.width_multiplier", config.projector.width_multiplier, ">= 1")
    for section in ("teacher", "student"):
        if config[section].model not in models.NAMES:
            raise invalid(f"{section}.model", config[section].model, f"one of {models.NAMES}")
    student_optimizer(config)  # checks the aggregator's name and hyperparameters


# ----------------------------------------------------------------------------- optimizers


def check_schedule(name: str, section: ml_collections.ConfigDict) -> None:
    if section.schedule not in SCHEDULES:
        raise invalid(f"{name}.schedule", section.schedule, f"one of {SCHEDULES}")
    boundaries = list(section.decay_boundaries)
    if section.schedule == "step" and (
        boundaries != sorted(set(boundaries))
        or not all(0 < b < section.num_train_steps for b in boundaries)
    ):
        raise invalid(
            f"{name}.decay_boundaries",
            tuple(boundaries),
            f"increasing steps between 0 and {name}.num_train_steps={section.num_train_steps}",
        )


def learning_rate_schedule(section: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0, then `schedule`: 'cosine' decays to 0 at `num_train_steps`;
    'step' multiplies the rate by `decay_factor` at each step of `decay_boundaries` (the
    ImageNet and CIFAR recipes: x0.1 at epochs 30/60/90 and 150/180/210)."""
    warmup_steps = min(section.warmup_steps, section.num_train_steps - 1)
    if section.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=section.learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=section.num_train_steps,
        )
    decay = optax.piecewise_constant_schedule(
        section.learning_rate,
        {boundary: section.decay_factor for boundary in section.decay_boundaries},
    )
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, section.learning_rate, warmup_steps)
    return optax.join_schedules([warmup, lambda step: decay(step + warmup_steps)], [warmup_steps])


def make_optimizer(section: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum 0.9 and L2 weight decay, or AdamW, on the schedule above."""
    schedule = learning_rate_schedule(section)
    if section.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(section.weight_decay), optax.sgd(schedule, momentum=0.9)
        )
    return optax.adamw(schedule, weight_decay=section.weight_decay)


# ----------------------------------------------------------------------------- state


def init_model(model, image_shape: tuple[int, ...], key: jax.Array) -> dict:
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_teacher_state(model, image_shape, tx, key) -> TrainState:
    variables = init_model(model, image_shape, key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        constants={},
        opt_state=tx.init(variables["params"]),
    )


def create_student_state(student, projector, image_shape, teacher_width, tx, key) -> TrainState:
    student_key, projector_key = jax.random.split(key)
    variables = init_model(student, image_shape, student_key)
    projector_variables = projector.init(
        projector_key, jnp.zeros((1, student.feature_width)), jnp.zeros((1, teacher_width))
    )
    params = {"student": variables["params"], "projector": projector_variables["params"]}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        constants=projector_variables["constants"],
        opt_state=tx.init(params),
    )


def shared_mask(params: Mapping[str, Any]) -> dict:
    """The student's parameters take part in the aggregation; the projector's do not."""
    return {
        "student": jax.tree.map(lambda _: True, params["student"]),
        "projector": jax.tree.map(lambda _: False, params["projector"]),
    }


def objective_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return OBJECTIVES[config.distill.objectives]


def aggregator_hparams(config: ml_collections.ConfigDict) -> dict:
    """The chosen aggregator's section of `config.aggregation` ({} when it has none)."""
    section = config.aggregation.get(config.aggregator)
    return section.to_dict() if section is not None else {}


def student_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """optax.chain(aggregator, optimizer). DOT brings its own momenta and weight decay, so
    it is followed by plain SGD on the schedule."""
    hparams = aggregator_hparams(config)
    if config.aggregator == "dot":
        hparams["weight_decay"] = config.student.weight_decay
    aggregator = aggregation.get(
        config.aggregator,
        num_objectives=len(objective_names(config)),
        shared=shared_mask,
        granularity=config.granularity,
        **hparams,
    )
    if config.aggregator == "dot":
        return optax.chain(aggregator, optax.sgd(learning_rate_schedule(config.student)))
    return optax.chain(aggregator, make_optimizer(config.student))


# ----------------------------------------------------------------------------- steps


def mix_batch(
    images: jax.Array,
    labels: jax.Array,
    step: jax.Array,
    *,
    seed: int,
    num_classes: int,
    augment: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
    """Mixup/CutMix and label smoothing of one batch (float pixels, soft targets [B, C]);
    the draw is a pure function of (seed, step), so resumed runs mix alike."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return mixup_cutmix(
        images,
        labels,
        key,
        num_classes,
        augment.mixup_alpha,
        augment.cutmix_alpha,
        augment.label_smoothing,
    )


def batch_mixer(config: ml_collections.ConfigDict, num_classes: int, seed: int) -> Callable | None:
    """`mix_batch` for the config's `augment` section, or None when it is all off."""
    augment = config.augment
    if not (augment.mixup_alpha or augment.cutmix_alpha or augment.label_smoothing):
        return None
    return functools.partial(mix_batch, seed=seed, num_classes=num_classes, augment=augment)


def dropout_rngs(step: jax.Array) -> dict[str, jax.Array]:
    """The dropout key of a training step (MobileNetV2 has dropout; the other models ignore
    it): a pure function of the step, so resumed runs drop alike."""
    return {"dropout": jax.random.fold_in(jax.random.key(0), step)}


def teacher_step(
    state: TrainState, images, labels, *, model, tx, mix: Callable | None = None
) -> tuple[TrainState, dict]:
    """One cross-entropy step of the teacher (on a `mix`ed batch when given)."""
    if mix is not None:
        images, labels = mix(images, labels, state.step)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            data.normalize(images),
            train=True,
            mutable=["batch_stats"],
            rngs=dropout_rngs(state.step),
        )
        return cross_entropy(logits, labels), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == hard_labels(labels))
    return new_state, {"loss": loss, "accuracy": accuracy}


def student_functions(
    state: TrainState,
    teacher_variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    *,
    student,
    teacher,
    projector,
    distill: ml_collections.ConfigDict,
) -> tuple[Callable, Callable]:
    """The teacher's forward pass (eval mode, on variables passed in, not differentiated),
    then the student's in two differentiable halves, split at its pooled features (the
    representation where the classifier and the projector branch off):

    encode(student_params) -> (pooled, new batch_stats), in train mode;
    head_objectives(params, pooled) -> (losses [K], (loss parts, logits)).
    """
    inputs = data.normalize(images)
    teacher_logits, teacher_features = teacher.apply(
        teacher_variables, inputs, train=False, return_features=True
    )
    # The projector and the losses run in float32 whatever the models' compute dtype.
    teacher_pooled = teacher_features["pooled"].astype(jnp.float32)

    def encode(student_params):
        features, updates = student.apply(
            {"params": student_params, "batch_stats": state.batch_stats},
            inputs,
            train=True,
            method="encode",
            mutable=["batch_stats"],
            rngs=dropout_rngs(state.step),
        )
        return features["pooled"].astype(jnp.float32), updates["batch_stats"]

    def head_objectives(params, pooled):
        logits = student.apply({"params": params["student"]}, pooled, method="classify")
        projected, target = projector.apply(
            {"params": params["projector"], "constants": state.constants},
            pooled,
            teacher_pooled,
        )
        losses, parts = loss_vector(
            logits, teacher_logits, labels, projected, target, state.step, distill
        )
        return losses, (parts, logits)

    return encode, head_objectives


def joined_objectives(encode: Callable, head_objectives: Callable) -> Callable:
    """`student_functions`' two halves as one function of all the parameters, the one a
    single `jax.vjp` differentiates: params -> (losses, (loss parts, logits, batch_stats))."""

    def objectives(params):
        pooled, batch_stats = encode(params["student"])
        losses, (parts, logits) = head_objectives(params, pooled)
        return losses, (parts, logits, batch_stats)

    return objectives


def representation_gradients(encode, head_objectives, params, combine):
    """Gradients for a representation method (GradDrop), as one row [1, ...].

    Two pullbacks instead of one: the head's (classifier, projector and losses, from the
    pooled features) gives every objective's gradient for the parameters after the
    representation and for the representation itself; `combine` merges the latter, and the
    encoder's pullback carries the merged representation gradient into the encoder.
    """
    pooled, encoder_pullback, batch_stats = jax.vjp(encode, params["student"], has_aux=True)
    losses, head_pullback, (parts, logits) = jax.vjp(head_objectives, params, pooled, has_aux=True)
    parameter_rows, representation_rows = jax.vmap(head_pullback)(jnp.eye(losses.shape[0]))
    combined, kept = combine(representation_rows)
    (encoder_gradient,) = encoder_pullback(combined)
    gradient = jax.tree.map(lambda rows: rows.sum(0), parameter_rows)
    gradient["student"] = jax.tree.map(jnp.add, gradient["student"], encoder_gradient)
    rows = jax.tree.map(lambda leaf: leaf[None], gradient)
    return rows, losses, (parts, logits, batch_stats), {"kept": kept}


def distill_step(
    state: TrainState,
    teacher_variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    *,
    student,
    teacher,
    projector,
    tx: optax.GradientTransformationExtraArgs,
    distill: ml_collections.ConfigDict,
    names: tuple[str, ...],
    mix: Callable | None = None,
) -> tuple[TrainState, dict]:
    """One MoKD step: per-objective gradients from one forward, aggregated by `tx`.

    The teacher runs in eval mode on variables passed in as an argument: they are neither
    closed over (no constant folding) nor differentiated (gradients reach only
    `state.params`, i.e. the student and its projector). One forward pass gives the loss
    vector and its pullback; pulling back the K unit rows gives the per-objective
    gradients J with a leading axis K, or, for the one-backward aggregators, a single
    weighted row gives their one gradient. The rows are pulled back one after another, not
    vmapped: XLA then runs ordinary convolution gradients instead of batched ones, which
    measured 16% faster for the whole ResNet-34 -> ResNet-18 step on CPU (0.58 s against
    0.69 s, scripts/benchmark.py); both share the one forward pass. Representation methods
    (GradDrop) combine the objectives at the pooled features instead
    (`representation_gradients`). With `mix`, teacher and student see the mixed batch and
    the task loss uses its soft targets.
    """
    if mix is not None:
        images, labels = mix(images, labels, state.step)
    encode, head_objectives = student_functions(
        state,
        teacher_variables,
        images,
        labels,
        student=student,
        teacher=teacher,
        projector=projector,
        distill=distill,
    )

    objectives = joined_objectives(encode, head_objectives)
    aggregator_state = state.opt_state[0]
    combine = getattr(aggregator_state, "combine_representation", None)
    if combine is not None:
        gradients, losses, aux, extra = representation_gradients(
            encode, head_objectives, state.params, combine
        )
    else:
        losses, pullback, aux = jax.vjp(objectives, state.params, has_aux=True)
        rows = jax.lax.stop_gradient(aggregation.backward_rows(aggregator_state, losses))
        gradients = jax.tree.map(
            lambda *per_row: jnp.stack(per_row), *[pullback(row)[0] for row in rows]
        )
        extra = {}
    parts, logits, batch_stats = aux
    updates, opt_state = tx.update(gradients, state.opt_state, state.params, losses=losses, **extra)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    weights = opt_state[0].weights
    metrics = {
        **{f"loss_{name}": losses[k] for k, name in enumerate(names)},
        **{f"loss_{name}": value for name, value in parts.items()},
        **{f"weight_{name}": weights[k] for k, name in enumerate(names)},
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == hard_labels(labels)),
    }
    if jax.tree.leaves(gradients)[0].shape[0] == len(names):  # per-objective gradients
        diagnostics = conflict_diagnostics(gram_matrix(gradients["student"])[0], names)
        metrics.update(diagnostics)
        metrics["conflict"] = (diagnostics[f"cos_task_{names[1]}"] < 0).astype(jnp.float32)
    return new_state, metrics


def bound_distill_step(config, *, student, teacher, projector, tx, mix=None) -> Callable:
    """`distill_step` with the models, optimizer and config bound:
    (state, teacher_variables, images, labels) -> (state, metrics)."""
    return functools.partial(
        distill_step,
        student=student,
        teacher=teacher,
        projector=projector,
        tx=tx,
        distill=config.distill,
        names=objective_names(config),
        mix=mix,
    )


def correct_predictions(variables, images, labels, mask, *, model) -> jax.Array:
    """[correct top-1, correct top-5, real examples] in a padded batch."""
    logits = model.apply(variables, data.normalize(images), train=False)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
    top1 = jnp.argmax(logits, -1) == labels
    return jnp.stack([(top1 & mask).sum(), (in_top5 & mask).sum(), mask.sum()])


def evaluate(model, variables, dataset, batch_size: int, mesh) -> dict[str, float]:
    """Top-1 and top-5 accuracy over every evaluation example exactly once.

    Every process reads the whole evaluation split and feeds its own rows of each batch.
    """
    rows = data.process_slice(batch_size, jax.process_index(), jax.process_count())
    sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
        functools.partial(correct_predictions, model=model),
        in_shardings=(variables_sharding(variables), sharding, sharding, sharding),
        out_shardings=parallel.replicated(mesh),
    )
    counts = sum(
        np.asarray(
            jax.device_get(
                step(
                    variables,
                    *parallel.global_batch(tuple(array[rows] for array in batch), sharding),
                )
            ),
            np.int64,
        )
        for batch in dataset.eval_batches(batch_size)
    )
    return {"test_accuracy": counts[0] / counts[2], "test_top5_accuracy": counts[1] / counts[2]}


def variables_sharding(variables: Any) -> Any:
    """The shardings that placed `variables` (global jax arrays)."""
    return jax.tree.map(lambda leaf: leaf.sharding, variables)


# ----------------------------------------------------------------------------- loop


def run_phase(
    name: str,
    state: TrainState,
    step_fn: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]],
    batches: Iterator[tuple[jax.Array, jax.Array]],
    num_steps: int,
    manager,
    fingerprint: Mapping[str, Any],
    writer,
    log_every_steps: int,
) -> tuple[TrainState, dict[str, float]]:
    """Runs `step_fn` from `state.step` to `num_steps`, saving and logging on the way.

    Every step's metrics go to `writer` with their own step number, but they are fetched
    from the device once per `log_every_steps`, so the loop never waits on the device each
    step; the log gets one line per `log_every_steps` and CLU's progress report (steps/s,
    ETA). A preemption notice (SIGTERM in a single-process run, see `PREEMPTION`; on
    several hosts Orbax's `reached_preemption`, which every host agrees on) saves the
    state at the current step and raises `Preempted`. Returns the final state and the mean
    of each metric over the steps run here.
    """
    from clu import periodic_actions  # imported here: see phase_writer

    first_step = int(state.step)
    report = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_steps=log_every_steps, every_secs=30.0
    )
    pending: list[tuple[int, dict]] = []
    sums: dict[str, float] = {}
    for step in range(first_step + 1, num_steps + 1):
        images, labels = next(batches)
        state, metrics = step_fn(state, images, labels)
        pending.append((step, metrics))
        report(step)
        if step % log_every_steps == 0 or step == num_steps:
            for logged_step, logged in jax.device_get(pending):
                writer.write_scalars(logged_step, logged)
                for key, value in logged.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            logging.info("%s step %d/%d: %s", name, step, num_steps, format_metrics(logged))
            pending = []
        preempted = preemption_noticed(manager, step)
        checkpoint.save(manager, step, state, fingerprint, force=step == num_steps or preempted)
        if preempted:
            manager.wait_until_finished()
            writer.flush()
            raise Preempted(name, step)
    manager.wait_until_finished()
    writer.flush()
    steps_run = max(num_steps - first_step, 1)
    return state, {key: total / steps_run for key, total in sums.items()}


def preemption_noticed(manager, step: int) -> bool:
    if jax.process_count() > 1:
        return manager.reached_preemption(step)
    return PREEMPTION.is_set()


def phase_writer(workdir: str, phase: str):
    """TensorBoard events of one phase in WORKDIR/tensorboard/<phase> (process 0 only).

    CLU's writers import TensorFlow, so the loop imports them here and not at the top: the
    step functions (what scripts/benchmark.py and library users call) then need neither,
    which keeps them importable where TensorFlow is not installed (e.g. a GPU image).
    """
    from clu import metric_writers

    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    directory = os.path.join(workdir, "tensorboard", phase)
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(directory))


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={float(value):.4g}" for key, value in sorted(metrics.items()))


def device_batches(
    dataset, batch_size: int, seed: int, start_step: int, mesh
) -> Iterator[tuple[jax.Array, ...]]:
    """Global batches sharded over the mesh; each process reads and places only its part."""
    sharding = parallel.batch_sharding(mesh)
    local = dataset.train_batches(
        batch_size,
        seed,
        start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return (parallel.global_batch(batch, sharding) for batch in local)


def initial_state(create, seed: int, manager, fingerprint, mesh, config, phase: str):
    """The phase's state, sharded over the mesh: restored from its newest checkpoint, or
    created directly in its shardings (`jit(create, out_shardings=...)`, so no device ever
    holds a full unsharded copy). Returns (state, its shardings)."""
    abstract = jax.eval_shape(create, jax.random.key(0))
    shardings = parallel.tree_shardings(mesh, abstract, config.mesh.fsdp_min_size)
    state = checkpoint.restore_latest(
        manager, parallel.with_shardings(abstract, shardings), fingerprint
    )
    if state is None:
        state = jax.jit(create, out_shardings=shardings)(jax.random.key(seed))
    else:
        logging.info("%s: resuming from step %d", phase, int(state.step))
    return state, shardings


def place_variables(variables: Mapping[str, Any], mesh, config) -> dict:
    """Model variables onto the mesh, FSDP-sharded like the train state."""
    shardings = parallel.tree_shardings(mesh, variables, config.mesh.fsdp_min_size)
    return jax.device_put(dict(variables), shardings)


def compiled_step(step_fn, state_shardings, mesh, extra_shardings=()):
    """`step_fn(state, *extra, images, labels)` jitted over the mesh, state donated."""
    batch = parallel.batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, *extra_shardings, batch, batch),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------- phases


def data_fingerprint(config: ml_collections.ConfigDict, dataset) -> dict:
    """The data fields that shape a trajectory (not the mesh: a run may resume on another
    number of devices)."""
    return {
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "num_classes": dataset.num_classes,
        "image_shape": list(dataset.image_shape),
        "recipe": config.recipe,
        "augment": config.augment.to_dict(),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "dtype": config.dtype,
    }


def teacher_identity(config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """What a teacher checkpoint must match to serve this run: architecture and classes."""
    return {"model": config.teacher.model, "num_classes": num_classes}


def check_teacher_identity(saved: Mapping[str, Any], expected: Mapping[str, Any], path: str):
    if saved.get("num_classes") != expected["num_classes"]:
        raise invalid(
            "teacher.num_classes",
            saved.get("num_classes"),
            f"the teacher checkpoint at {path} must have the student's class count "
            f"{expected['num_classes']}",
        )
    if saved.get("model") != expected["model"]:
        raise invalid(
            "teacher.model",
            expected["model"],
            f"the teacher checkpoint at {path} holds a {saved.get('model')!r}",
        )


def build_model(config: ml_collections.ConfigDict, role: str, dataset):
    """The teacher's or student's module for `dataset`, computing in `config.dtype`."""
    return models.get(
        config[role].model,
        num_classes=dataset.num_classes,
        dtype=config.dtype,
        image_size=dataset.image_shape[0],
    )


def check_teacher_fits(variables: Mapping[str, Any], config, dataset, directory: str) -> None:
    """Raises InputError when restored teacher variables do not fit the teacher model on
    this dataset's images (e.g. an RGB ImageNet teacher on grayscale digits), naming the
    first variable whose shape differs, instead of a shape error deep inside Flax."""
    model = build_model(config, "teacher", dataset)
    expected = jax.eval_shape(
        functools.partial(init_model, model, dataset.image_shape), jax.random.key(0)
    )
    expected_shapes = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {key: expected[key] for key in ("params", "batch_stats") if key in expected}
        )
    }
    saved_shapes = {
        jax.tree_util.keystr(path): np.shape(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(dict(variables))
    }
    for name in sorted(set(expected_shapes) | set(saved_shapes)):
        if expected_shapes.get(name) != saved_shapes.get(name):
            raise invalid(
                "teacher.checkpoint_dir",
                directory,
                f"variables of a {config.teacher.model} for {dataset.name} images of shape "
                f"{tuple(dataset.image_shape)}; {name} has shape {saved_shapes.get(name)}, "
                f"the model needs {expected_shapes.get(name)}",
            )


def train_teacher(config, workdir, dataset, mesh) -> dict:
    """Phase 1: cross-entropy training of the teacher; returns its variables."""
    model = build_model(config, "teacher", dataset)
    tx = make_optimizer(config.teacher)
    create = functools.partial(create_teacher_state, model, dataset.image_shape, tx)
    fingerprint = {**data_fingerprint(config, dataset), "teacher": config.teacher.to_dict()}
    manager = checkpoint.open_manager(
        os.path.join(workdir, "checkpoints", "teacher"),
        config.checkpoint_every_steps,
        config.max_checkpoints_to_keep,
    )
    state, shardings = initial_state(
        create, config.seed, manager, fingerprint, mesh, config, "teacher"
    )
    mix = batch_mixer(config, dataset.num_classes, config.seed)
    step_fn = compiled_step(
        functools.partial(teacher_step, model=model, tx=tx, mix=mix), shardings, mesh
    )
    state, _ = run_phase(
        "teacher",
        state,
        step_fn,
        device_batches(dataset, config.batch_size, config.seed, int(state.step), mesh),
        config.teacher.num_train_steps,
        manager,
        fingerprint,
        phase_writer(workdir, "teacher"),
        config.log_every_steps,
    )
    manager.close()
    return {"params": state.params, "batch_stats": state.batch_stats}


def obtain_teacher(config, workdir, dataset, mesh) -> dict:
    """The teacher's variables on the mesh: from `teacher.checkpoint_dir`, or trained in
    WORKDIR/teacher."""
    identity = teacher_identity(config, dataset.num_classes)
    directory = config.teacher.checkpoint_dir or os.path.join(workdir, "teacher")
    saved_identity = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
    if saved_identity is not None:
        check_teacher_identity(saved_identity, identity, directory)
        logging.info("teacher: restored from %s", directory)
        variables = checkpoint.load_variables(directory)
        check_teacher_fits(variables, config, dataset, directory)
        return place_variables(variables, mesh, config)
    if config.teacher.checkpoint_dir:
        raise invalid(
            "teacher.checkpoint_dir", directory, "a directory holding a teacher checkpoint"
        )
    variables = train_teacher(config, workdir, dataset, mesh)
    checkpoint.export_variables(directory, variables, identity, config.teacher.num_train_steps)
    return variables


def distill_student(config, workdir, dataset, teacher_variables, mesh):
    """Phase 2: MoKD distillation of the student; returns (student variables, diagnostics)."""
    num_classes = dataset.num_classes
    student = build_model(config, "student", dataset)
    teacher = build_model(config, "teacher", dataset)
    teacher_width = teacher.feature_width
    projector = SubspaceProjector(
        width=config.projector.width_multiplier * teacher_width,
        orthogonal_init=config.projector.orthogonal_init,
        seed=config.seed,
    )
    tx = student_optimizer(config)
    create = functools.partial(
        create_student_state, student, projector, dataset.image_shape, teacher_width, tx
    )
    fingerprint = {
        **data_fingerprint(config, dataset),
        **{key: config[key].to_dict() for key in ("teacher", "student", "distill", "projector")},
        "aggregator": config.aggregator,
        "aggregation": aggregator_hparams(config),
        "granularity": config.granularity,
    }
    manager = checkpoint.open_manager(
        os.path.join(workdir, "checkpoints", "student"),
        config.checkpoint_every_steps,
        config.max_checkpoints_to_keep,
    )
    state, shardings = initial_state(
        create, config.seed + 1, manager, fingerprint, mesh, config, "student"
    )
    step_fn = compiled_step(
        bound_distill_step(
            config,
            student=student,
            teacher=teacher,
            projector=projector,
            tx=tx,
            mix=batch_mixer(config, num_classes, config.seed + 1),
        ),
        shardings,
        mesh,
        extra_shardings=(variables_sharding(teacher_variables),),
    )
    state, means = run_phase(
        "student",
        state,
        lambda s, x, y: step_fn(s, teacher_variables, x, y),
        device_batches(dataset, config.batch_size, config.seed, int(state.step), mesh),
        config.student.num_train_steps,
        manager,
        fingerprint,
        phase_writer(workdir, "student"),
        config.log_every_steps,
    )
    manager.close()
    return {"params": state.params["student"], "batch_stats": state.batch_stats}, means


def parameter_count(variables: Mapping[str, Any]) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def load_dataset(config: ml_collections.ConfigDict):
    """The config's dataset (`mokd_jax.data.load` with its data fields)."""
    return data.load(
        config.dataset,
        config.data_dir,
        config.num_classes,
        image_size=config.image_size,
        recipe=config.recipe,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the three phases and writes WORKDIR/summary.json; returns the summary."""
    start = time.time()
    check_config(config)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size("batch_size", config.batch_size, mesh)
    parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
    dataset = load_dataset(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    teacher_variables = obtain_teacher(config, workdir, dataset, mesh)
    student_variables, diagnostics = distill_student(
        config, workdir, dataset, teacher_variables, mesh
    )
    checkpoint.export_variables(
        os.path.join(workdir, "student"),
        student_variables,
        {"model": config.student.model, "num_classes": dataset.num_classes},
        config.student.num_train_steps,
    )

    accuracies = {}
    for role, variables in (("teacher", teacher_variables), ("student", student_variables)):
        model = build_model(config, role, dataset)
        accuracies[role] = evaluate(model, variables, dataset, config.eval_batch_size, mesh)
        writer = phase_writer(workdir, role)
        writer.write_scalars(config[role].num_train_steps, accuracies[role])
        writer.close()
    summary = {
        "method": config.aggregator,
        "dataset": dataset.name,
        "devices": mesh.size,
        "teacher": {
            "model": config.teacher.model,
            "parameters": parameter_count(teacher_variables),
            **accuracies["teacher"],
        },
        "student": {
            "model": config.student.model,
            "parameters": parameter_count(student_variables),
            **accuracies["student"],
        },
        "training_diagnostics": diagnostics,
        "wall_time_s": time.time() - start,
    }
    if jax.process_index() == 0:
        plots.plot_diagnostics(
            os.path.join(workdir, "tensorboard", "student"),
            os.path.join(workdir, "diagnostics.png"),
            title=f"{config.aggregator} on {dataset.name}: student {config.student.model}",
        )
        epath.Path(workdir, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
