"""The pure, jittable steps: teacher step, distillation step, evaluation step.

Nothing here does I/O or imports CLU, Orbax or TensorFlow: these are the functions a
library user, the benchmark and the tests call directly. The data flow of one distillation
step (docs/architecture.md):

    batch -> teacher forward (eval mode, its variables passed in as an argument)
          -> student forward (one pass, its taps) + one projector per tap
          -> losses [task, distill]
          -> per-objective gradients J: the pullback of each unit row, leading axis K
          -> optax.chain(aggregator, optimizer) turns J into one update
          -> new state; metrics (losses, cos(g_task, g_distill), norm ratio, weights)

How the gradients are formed for an aggregator is its contract
(`mokd_jax.aggregation.AggregatorSpec.drive`), read here and nowhere else.

The task is a parameter of the distillation step (`TaskFunctions`): classification's
`student_functions` by default, RetinaNet detection's
`mokd_jax.detection.steps.detection_student_functions`. A task says how its batch runs
through teacher and student and what its loss vector is; the per-objective gradients, the
aggregation and the logged diagnostics are the same code for every task.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mokd_jax import aggregation, normalization, taps
from mokd_jax.aggregation.gram import conflict_diagnostics, gram_matrix
from mokd_jax.data.mixing import mixup_cutmix, random_erasing
from mokd_jax.networks import Networks
from mokd_jax.objectives import cross_entropy, hard_labels, loss_vector, objective_names
from mokd_jax.state import TrainState, shared_mask


def mix_batch(
    images: jax.Array,
    labels: jax.Array,
    step: jax.Array,
    *,
    seed: int,
    num_classes: int,
    augment: ml_collections.ConfigDict,
    erase_statistics: normalization.Normalization,
) -> tuple[jax.Array, jax.Array]:
    """Random erasing, Mixup/CutMix and label smoothing of one batch (float pixels, soft
    targets [B, C]); the draw is a pure function of (seed, step), so resumed runs mix
    alike. Erased pixels are noise in `erase_statistics` (`mixing.random_erasing`)."""
    erase_key, mix_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), step))
    images = jnp.asarray(images, jnp.float32)
    images = random_erasing(images, erase_key, augment.random_erasing, erase_statistics)
    return mixup_cutmix(
        images,
        labels,
        mix_key,
        num_classes,
        augment.mixup_alpha,
        augment.cutmix_alpha,
        augment.label_smoothing,
    )


_BATCH_AUGMENTATIONS = ("mixup_alpha", "cutmix_alpha", "label_smoothing", "random_erasing")


def batch_mixer(config: ml_collections.ConfigDict, num_classes: int, seed: int) -> Callable | None:
    """`mix_batch` for the config's `augment` section, or None when it is all off; erased
    pixels are noise in the dataset's standard statistics (timm's ImageNet ones for
    imagenet2012)."""
    augment = config.augment
    if not any(augment[field] for field in _BATCH_AUGMENTATIONS):
        return None
    return functools.partial(
        mix_batch,
        seed=seed,
        num_classes=num_classes,
        augment=augment,
        erase_statistics=normalization.for_dataset(config.dataset),
    )


def dropout_rngs(step: jax.Array) -> dict[str, jax.Array]:
    """The dropout key of a training step (MobileNetV2 has dropout; the other models ignore
    it): a pure function of the step, so resumed runs drop alike."""
    return {"dropout": jax.random.fold_in(jax.random.key(0), step)}


def advanced(state: TrainState, updates, batch_stats, opt_state) -> TrainState:
    """The state after one step: updates applied, new BatchNorm statistics and optimizer
    state, step counter + 1."""
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of examples whose arg-max logit is their (dominant) label."""
    return jnp.mean(jnp.argmax(logits, -1) == hard_labels(labels))


def teacher_step(
    state: TrainState,
    images,
    labels,
    *,
    model,
    tx,
    inputs: normalization.Normalization,
    mix: Callable | None = None,
) -> tuple[TrainState, dict]:
    """One cross-entropy step of the teacher, fed through its `inputs` statistics (on a
    `mix`ed batch when given)."""
    if mix is not None:
        images, labels = mix(images, labels, state.step)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            normalization.apply(inputs, images),
            train=True,
            mutable=["batch_stats"],
            rngs=dropout_rngs(state.step),
        )
        return cross_entropy(logits, labels), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = advanced(state, updates, batch_stats, opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy(logits, labels)}


TaskFunctions = Callable[..., tuple[Callable, Callable]]
"""What makes a distillation step a task's: `(state, teacher_variables, *batch, networks=,
distill=) -> (encode, head_objectives)`, the student's forward pass in two differentiable
halves, split at its taps, after the teacher's forward pass (eval mode, on variables passed
in, not differentiated):

encode(student_params) -> (taps, new batch_stats);
head_objectives(params, taps) -> (losses [K], (loss parts, task metrics)), params being
  {'student', 'projector'}; both dicts hold scalars, logged as `loss_<part>` and as named.

The first tap is the representation, where a representation method (GradDrop) combines
the objectives' gradients (`representation_gradients`)."""


def student_encoder(student, state: TrainState, student_inputs: jax.Array, tap_set: str):
    """Classification's `encode`: the student's parameters -> (its taps of `tap_set` from
    one train-mode forward pass on the normalised `student_inputs`, new batch_stats)."""

    def encode(student_params):
        features, updates = student.apply(
            {"params": student_params, "batch_stats": state.batch_stats},
            student_inputs,
            train=True,
            method="encode",
            mutable=["batch_stats"],
            rngs=dropout_rngs(state.step),
        )
        return taps.select(features, tap_set), updates["batch_stats"]

    return encode


def student_functions(
    state: TrainState,
    teacher_variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    *,
    networks: Networks,
    distill: ml_collections.ConfigDict,
) -> tuple[Callable, Callable]:
    """Classification's `TaskFunctions`: the student split at its taps (`mokd_jax.taps`:
    `pooled` first, the representation where the classifier and the projectors branch
    off, then the other taps of `networks.taps`, all from the same forward pass); `encode`
    runs in train mode, and the task metric is the batch's `accuracy`."""
    student = networks.student
    teacher_logits, teacher_features = networks.teacher.apply(
        teacher_variables,
        normalization.apply(networks.teacher_input, images),
        train=False,
        return_features=True,
    )
    student_inputs = normalization.apply(networks.student_input, images)
    teacher_taps = taps.select(teacher_features, networks.taps)
    encode = student_encoder(student, state, student_inputs, networks.taps)

    def head_objectives(params, student_taps):
        pooled = student_taps[0]
        logits = student.apply({"params": params["student"]}, pooled, method="classify")
        projections = networks.projector.apply(
            {"params": params["projector"], "constants": state.constants},
            student_taps,
            teacher_taps,
        )
        losses, parts = loss_vector(
            logits, teacher_logits, labels, projections, state.step, distill
        )
        return losses, (parts, {"accuracy": accuracy(logits, labels)})

    return encode, head_objectives


def joined_objectives(encode: Callable, head_objectives: Callable) -> Callable:
    """A task's two halves (`TaskFunctions`) as one function of all the parameters, the one
    a single `jax.vjp` differentiates: params -> (losses, (loss parts, task metrics,
    batch_stats))."""

    def objectives(params):
        student_taps, batch_stats = encode(params["student"])
        losses, (parts, task_metrics) = head_objectives(params, student_taps)
        return losses, (parts, task_metrics, batch_stats)

    return objectives


def row_gradients(objectives: Callable, params, rows_for: Callable):
    """One forward pass of `objectives` and the pullback of each row of
    `rows_for(losses)` ([R, K]), stacked: gradients with leading axis R.

    The rows are pulled back one after another, not vmapped: XLA then runs ordinary
    convolution gradients instead of batched ones, which measured 16% faster for the whole
    ResNet-34 -> ResNet-18 step on CPU (0.58 s against 0.69 s, the benchmark); all rows
    share the one forward pass.
    """
    losses, pullback, aux = jax.vjp(objectives, params, has_aux=True)
    rows = jax.lax.stop_gradient(rows_for(losses))
    gradients = jax.tree.map(
        lambda *per_row: jnp.stack(per_row), *[pullback(row)[0] for row in rows]
    )
    return gradients, losses, aux


def representation_gradients(encode, head_objectives, params, combine):
    """Gradients for a representation method (GradDrop), as one row [1, ...].

    Two pullbacks instead of one: the head's (classifier or detection heads, projectors
    and losses, from the student's taps) gives every objective's gradient for the
    parameters after the representation and for each tap; `combine` merges the objectives'
    gradients at the representation, the first tap (classification's pooled features, a
    detector's C5), while the other taps' gradients are summed over the objectives, as the
    ordinary pullback would; the encoder's pullback carries both into the encoder.
    """
    student_taps, encoder_pullback, batch_stats = jax.vjp(encode, params["student"], has_aux=True)
    losses, head_pullback, (parts, task_metrics) = jax.vjp(
        head_objectives, params, student_taps, has_aux=True
    )
    parameter_rows, tap_rows = jax.vmap(head_pullback)(jnp.eye(losses.shape[0]))
    combined, kept = combine(tap_rows[0])
    (encoder_gradient,) = encoder_pullback((combined, *(rows.sum(0) for rows in tap_rows[1:])))
    gradient = jax.tree.map(lambda rows: rows.sum(0), parameter_rows)
    gradient["student"] = jax.tree.map(jnp.add, gradient["student"], encoder_gradient)
    rows = jax.tree.map(lambda leaf: leaf[None], gradient)
    return rows, losses, (parts, task_metrics, batch_stats), {"kept": kept}


def distill_step(
    state: TrainState,
    teacher_variables: Mapping[str, Any],
    *batch: Any,
    networks: Any,
    tx: optax.GradientTransformationExtraArgs,
    aggregator: aggregation.AggregatorSpec,
    distill: ml_collections.ConfigDict,
    mix: Callable | None = None,
    task: TaskFunctions = student_functions,
    trainable: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, dict]:
    """One MoKD step: per-objective gradients from one forward, aggregated by `tx`.

    The teacher runs in eval mode on variables passed in as an argument: they are neither
    closed over (no constant folding) nor differentiated (gradients reach only
    `state.params`, i.e. the student and its projector). What is pulled back is the
    aggregator's contract (`aggregator.drive`): the K unit rows (per-objective gradients J,
    leading axis K), one weighted row (one backward), or, for a representation method, the
    objectives combined at the representation (`representation_gradients`).

    `batch` is the task's (classification: images, labels; detection: one
    `DetectionBatch`), `networks` the task's bundle, and `task` turns them into the two
    halves of the student (`TaskFunctions`). With `mix` (classification's
    `mix(images, labels, step)`), teacher and student see the mixed batch and the task loss
    uses its soft targets. `trainable`: as `make_distill_step`'s.
    """
    if mix is not None:
        batch = mix(*batch, state.step)
    encode, head_objectives = task(
        state, teacher_variables, *batch, networks=networks, distill=distill
    )
    method_state = aggregation.find_state(state.opt_state)
    extra = {}
    if aggregator.drive == aggregation.REPRESENTATION:
        combine = functools.partial(aggregator.combine_representation, method_state)
        gradients, losses, aux, extra = representation_gradients(
            encode, head_objectives, state.params, combine
        )
    else:
        gradients, losses, aux = row_gradients(
            joined_objectives(encode, head_objectives),
            state.params,
            functools.partial(aggregation.backward_rows, aggregator, method_state),
        )
    parts, task_metrics, batch_stats = aux
    updates, opt_state = tx.update(gradients, state.opt_state, state.params, losses=losses, **extra)
    new_state = advanced(state, updates, batch_stats, opt_state)
    names = objective_names(distill)
    weights = aggregation.weights(opt_state)
    metrics = {
        **{f"loss_{name}": losses[k] for k, name in enumerate(names)},
        **{f"loss_{name}": value for name, value in parts.items()},
        **{f"weight_{name}": weights[k] for k, name in enumerate(names)},
        **task_metrics,
    }
    if aggregator.drive == aggregation.PER_OBJECTIVE:
        aggregated = shared_mask(state.params, trainable)
        diagnostics = conflict_diagnostics(gram_matrix(gradients, aggregated)[0], names)
        metrics.update(diagnostics)
        metrics["conflict"] = (diagnostics[f"cos_task_{names[1]}"] < 0).astype(jnp.float32)
    return new_state, metrics


def make_distill_step(
    config: ml_collections.ConfigDict,
    networks: Any,
    tx,
    mix: Callable | None = None,
    task: TaskFunctions = student_functions,
    trainable: Callable[[Any], Any] | None = None,
) -> Callable:
    """`distill_step` with the networks, optimizer, aggregator contract, config and task
    bound: (state, teacher_variables, *batch) -> (state, metrics). `trainable`: the
    parameters `tx` trains, when not all (`optimizers.student_optimizer`'s); the conflict
    diagnostics then read the gradients the aggregator combines, so that a frozen
    parameter's gradient is never needed."""
    return functools.partial(
        distill_step,
        networks=networks,
        tx=tx,
        aggregator=aggregation.spec(config.aggregator),
        distill=config.distill,
        mix=mix,
        task=task,
        trainable=trainable,
    )


def summed_distill_step(
    state: TrainState,
    teacher_variables: Mapping[str, Any],
    *batch: Any,
    networks: Any,
    tx: optax.GradientTransformation,
    distill: ml_collections.ConfigDict,
    task: TaskFunctions = student_functions,
) -> tuple[TrainState, dict]:
    """Summed KD with one backward, the plain recipe's step: the loss vector pulled back
    with a ones row gives the gradient of the sum directly, which `distill_step` with `sum`
    does not (it pulls back the K unit rows, sums them in the aggregator and logs the
    conflict diagnostics). `tx` is the plain optimizer, without an aggregator; `batch`
    and `task` as in `distill_step`."""
    encode, head_objectives = task(
        state, teacher_variables, *batch, networks=networks, distill=distill
    )
    objectives = joined_objectives(encode, head_objectives)
    losses, pullback, (_, _, batch_stats) = jax.vjp(objectives, state.params, has_aux=True)
    (gradient,) = pullback(jnp.ones_like(losses))
    updates, opt_state = tx.update(gradient, state.opt_state, state.params)
    new_state = advanced(state, updates, batch_stats, opt_state)
    return new_state, {"loss": losses.sum()}


def predict(variables, images, *, model, inputs: normalization.Normalization) -> jax.Array:
    """The eval-mode logits of a network on uint8 `images`, fed through its `inputs`
    statistics: what evaluation ranks, and what parity with PyTorch is measured on."""
    return model.apply(variables, normalization.apply(inputs, images), train=False)


def correct_predictions(
    variables, images, labels, mask, *, model, inputs: normalization.Normalization
) -> jax.Array:
    """The evaluation step of a network fed through its `inputs` statistics: [correct
    top-1, correct top-5, real examples] in a padded batch."""
    logits = predict(variables, images, model=model, inputs=inputs)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
    top1 = jnp.argmax(logits, -1) == labels
    return jnp.stack([(top1 & mask).sum(), (in_top5 & mask).sum(), mask.sum()])
