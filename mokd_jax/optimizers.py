"""Learning-rate schedules and optimizers, and the student's chain: aggregator, optimizer.

The student's gradient transformation is `optax.chain(aggregator, optimizer)`: the
aggregator turns the per-objective gradients into one update, which an ordinary Optax
optimizer then applies. A method that keeps its own momenta and weight decay
(`AggregatorSpec.owns_momentum`: dot) is followed by plain SGD on the schedule instead, and
takes the hyperparameters it shares with the optimizer (`from_optimizer`) from the
student's section.

Weight decay applies to every parameter (`weight_decay_mask` 'all': torchvision's and
mdistiller's recipes), or, with 'timm', to all but the biases, the norm layers' scales and
biases and the ViT's position embedding and class token (timm's
`param_groups_weight_decay`: parameters of one dimension or less, and the names of the
model's `no_weight_decay()`), as DeiT trains. A method that owns its weight decay (dot)
decays what it decays itself.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from mokd_jax import aggregation
from mokd_jax.objectives import objective_names
from mokd_jax.state import shared_mask

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
WEIGHT_DECAY_MASKS = ("all", "timm")
# timm's VisionTransformer.no_weight_decay(): decayed by no recipe that uses the 'timm' mask.
NO_WEIGHT_DECAY_NAMES = frozenset({"pos_embed", "cls_token"})


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


def timm_decay_mask(params):
    """True for the parameters timm decays: more than one dimension, and not named in
    NO_WEIGHT_DECAY_NAMES (a pytree of bools shaped as `params`)."""

    def decayed(path, leaf) -> bool:
        name = getattr(path[-1], "key", None)
        return leaf.ndim > 1 and name not in NO_WEIGHT_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decayed, params)


def decay_mask(section: ml_collections.ConfigDict):
    """optax's `mask` argument for the section's `weight_decay_mask` (None: decay all)."""
    return timm_decay_mask if section.weight_decay_mask == "timm" else None


def make_optimizer(section: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum 0.9 and L2 weight decay, or AdamW, on the schedule above; the
    decay on the parameters of `decay_mask`."""
    schedule = learning_rate_schedule(section)
    mask = decay_mask(section)
    if section.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(section.weight_decay, mask),
            optax.sgd(schedule, momentum=0.9),
        )
    return optax.adamw(schedule, weight_decay=section.weight_decay, mask=mask)


def aggregator_hparams(config: ml_collections.ConfigDict) -> dict:
    """The chosen aggregator's section of `config.aggregation` ({} when it has none)."""
    section = config.aggregation.get(config.aggregator)
    return section.to_dict() if section is not None else {}


def make_aggregator(
    config: ml_collections.ConfigDict, trainable: Callable[[Any], Any] | None = None
) -> optax.GradientTransformationExtraArgs:
    """The config's aggregator over the student's parameters, only its `trainable` ones
    where given (`state.shared_mask`: the projector's and frozen parameters' gradients pass
    through it unaggregated), with its hyperparameters and those it takes from the
    student's optimizer section."""
    spec = aggregation.spec(config.aggregator)
    hparams = aggregator_hparams(config)
    hparams.update({key: config.student[key] for key in spec.from_optimizer})
    return aggregation.get(
        config.aggregator,
        num_objectives=len(objective_names(config.distill)),
        shared=functools.partial(shared_mask, trainable=trainable),
        granularity=config.granularity,
        **hparams,
    )


def only_trainable(
    optimizer: optax.GradientTransformation, trainable: Callable[[Any], Any]
) -> optax.GradientTransformation:
    """`optimizer` on the parameters that `trainable(params)` (a pytree of bools of their
    structure) marks True, zero updates for the others: `optax.masked` alone would pass
    the others' raw gradients through as updates."""
    return optax.multi_transform({True: optimizer, False: optax.set_to_zero()}, trainable)


def student_optimizer(
    config: ml_collections.ConfigDict, trainable: Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """optax.chain(aggregator, optimizer): plain SGD on the schedule after a method that
    owns its momenta and weight decay, else the student's configured optimizer. With
    `trainable`, the optimizer updates only those parameters (`only_trainable`: a
    detector's frozen backbone parts) and the aggregator combines only theirs."""
    if aggregation.spec(config.aggregator).owns_momentum:
        optimizer = optax.sgd(learning_rate_schedule(config.student))
    else:
        optimizer = make_optimizer(config.student)
    if trainable is not None:
        optimizer = only_trainable(optimizer, trainable)
    return optax.chain(make_aggregator(config, trainable), optimizer)
