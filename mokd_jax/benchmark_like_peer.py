"""The step our benchmark runs when it is compared with the PyTorch peer
(`--framework=torch|both`): the same work as `mokd_jax.torch_peer`'s steps, so that the
ratios ours / peer compare like with like.

The peer's losses are [task_weight * CE, logit_weight * T^2 KL] and its optimizer SGD with
momentum 0.9 and L2 weight decay at a constant learning rate. Ours then run the same:

- logits only (`logit_student_functions`): no projector and no feature loss. The other
  way, giving the peer our feature loss, would mean porting our subspace projectors and
  multi-scale taps to torch; the peer would then no longer be the plain PyTorch KD step it
  stands for, and it would be one more copy of our method to keep equal. Zeroing
  `feature_weight` alone would not do: the projectors would still run, times zero.
  The students' states carry an empty projector (`logits_only_state`), so every tree
  operation of the steps (the aggregator's shared mask, the optimizer) keeps its shape.
- SGD, momentum 0.9, weight decay `student.weight_decay` on every parameter, constant rate
  (`LIKE_PEER`): the optimizer of the ResNet recipes the peer writes; AdamW would cost
  both sides a little more and change nothing in the comparison.

Every mode of ours runs this recipe in such a run (`ce` its optimizer), so that the ratios
between our modes stay comparable within the run; `--framework=jax` keeps the config's
recipe (feature loss, AdamW), the one the cost goals were first measured with.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mokd_jax import normalization
from mokd_jax.objectives import cross_entropy, logit_distillation, weighted_objectives
from mokd_jax.state import TrainState
from mokd_jax.steps import accuracy, student_encoder

LIKE_PEER: dict[str, Any] = {
    "student.optimizer": "sgd",
    "student.schedule": "step",
    "student.decay_boundaries": (),
    "student.warmup_steps": 0,
    "student.weight_decay_mask": "all",
    "distill.feature_weight": 0.0,
    "distill.logit_loss": "kd",
}
"""Config overrides that make our steps the peer's: its optimizer (SGD, constant rate,
decay on every parameter), its losses (no feature loss, Hinton's KD on the logits)."""


def logit_student_functions(
    state: TrainState,
    teacher_variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    *,
    networks: Any,
    distill: ml_collections.ConfigDict,
) -> tuple:
    """Classification's `steps.TaskFunctions` without projectors: the loss vector of
    `distill.objectives` with a feature loss of 0 (the peer's [CE, T^2 KL] for 'merged').
    `encode` gives the pooled features alone, the representation where the classifier
    branches off."""
    student = networks.student
    teacher_logits = networks.teacher.apply(
        teacher_variables, normalization.apply(networks.teacher_input, images), train=False
    )
    student_inputs = normalization.apply(networks.student_input, images)
    encode = student_encoder(student, state, student_inputs, "pooled")

    def head_objectives(params, student_taps):
        logits = student.apply({"params": params["student"]}, student_taps[0], method="classify")
        task = cross_entropy(logits, labels)
        logit = logit_distillation(logits, teacher_logits, labels, state.step, distill)
        losses = weighted_objectives(task, logit, jnp.zeros(()), distill)
        parts = {"cross_entropy": task, "kd_logit": logit}
        return losses, (parts, {"accuracy": accuracy(logits, labels)})

    return encode, head_objectives


def logits_only_state(student_variables: Mapping[str, Any], tx) -> TrainState:
    """A student's state for `logit_student_functions` from its variables ({'params',
    'batch_stats'}), with an empty projector in `params` (there is none to train)."""
    params = {"student": student_variables["params"], "projector": {}}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=student_variables.get("batch_stats", {}),
        constants={},
        opt_state=tx.init(params),
    )
