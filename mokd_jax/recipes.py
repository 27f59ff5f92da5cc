"""Methods as recipes: what selecting a method (`kd`, `dkd`, `dot`, `mokd`, ...) sets in a
run configuration, from the reference values a config carries in its `recipes` section.

A config file fills `config.recipes` with its pair's reference hyperparameters (the CIFAR-100
and ImageNet configs: mdistiller's, with the source file beside each value; the digits
config: the base defaults) and selects one method with `method_overrides`; `mokd-compare`
applies every compared method's overrides to the same config, so that each method runs on
its own recipe. The methods:

- `ce`: the student alone, the task cross-entropy with weight 1 (mdistiller's vanilla run);
  the distillation objective is still computed (for the logged diagnostics) but weighted 0.
- `kd`: Hinton KD, `task_weight` x CE + `logit_weight` x KD at the KD recipe's temperature,
  summed; no feature loss (mdistiller's KD distiller).
- `kd_feature`: `kd` plus the projector's feature loss, summed: the plain-sum counterpart of
  the aggregator methods below, so that `kd_feature` against `mokd` isolates the aggregator.
- `dkd`: CE (weight `dkd.task_weight`) + warm-up x (alpha TCKD + beta NCKD), summed; no
  feature loss (mdistiller's DKD distiller).
- `dot`: the KD recipe's losses under DOT's two momenta, on SGD at `dot.learning_rate` with
  DOT's `delta` (mdistiller's DOT trainer runs the KD distiller).
- every other aggregator (`mokd`, `mgda`, `pcgrad`, ...): that aggregator on the KD recipe's
  losses plus the feature loss at `recipes.feature_weight`, MoKD's objective vector
  [task, logit + feature] (docs/method.md). With `mokd`'s default rescale the combined step
  has the norm of `kd_feature`'s, so the KD recipe's learning rate carries over.

The objective weights live in the loss vector (`distill.task_weight`, `logit_weight`,
`feature_weight`) and the summed methods add the objectives with unit weights, so the
"plain recipe's update" is the unweighted sum of the loss vector's gradients for every
method.
"""

from typing import Any

import ml_collections

from mokd_jax import aggregation
from mokd_jax.errors import invalid

BASELINES = ("ce", "kd", "kd_feature", "dkd", "dot")
METHODS = (*BASELINES, *(name for name in aggregation.NAMES if name not in BASELINES))
"""Every method a config or `mokd-compare` can select: the baselines, then the aggregators."""

SUMMED = {"aggregator": "sum", "aggregation.sum.weights": (1.0, 1.0)}


def recipes_section() -> ml_collections.ConfigDict:
    """The reference values the methods are built from, with the digits run's defaults;
    the CIFAR-100 and ImageNet configs replace them with their pair's published ones."""
    recipes = ml_collections.ConfigDict()
    recipes.kd = ml_collections.ConfigDict(
        {"temperature": 4.0, "task_weight": 1.0, "logit_weight": 1.0}
    )
    recipes.dkd = ml_collections.ConfigDict(
        {
            "temperature": 4.0,
            "task_weight": 1.0,
            "alpha": 1.0,
            "beta": 8.0,
            "warmup_steps": 100,
        }
    )
    # DOT replaces SGD's momentum, so it runs on SGD whatever the config's optimizer.
    recipes.dot = ml_collections.ConfigDict({"delta": 0.075, "learning_rate": 0.05})
    recipes.feature_weight = 1.0  # the feature loss of kd_feature and the aggregator methods
    return recipes


def kd_losses(recipes: ml_collections.ConfigDict, feature_weight: float) -> dict[str, Any]:
    """The KD recipe's loss vector: [task_weight CE, logit_weight KD + feature_weight feature]."""
    return {
        "distill.logit_loss": "kd",
        "distill.temperature": recipes.kd.temperature,
        "distill.task_weight": recipes.kd.task_weight,
        "distill.logit_weight": recipes.kd.logit_weight,
        "distill.feature_weight": feature_weight,
    }


def dkd_losses(recipes: ml_collections.ConfigDict) -> dict[str, Any]:
    """The DKD recipe's loss vector: [task_weight CE, warm-up (alpha TCKD + beta NCKD)]."""
    return {
        "distill.logit_loss": "dkd",
        "distill.temperature": recipes.dkd.temperature,
        "distill.task_weight": recipes.dkd.task_weight,
        "distill.logit_weight": 1.0,
        "distill.feature_weight": 0.0,
        "distill.dkd_alpha": recipes.dkd.alpha,
        "distill.dkd_beta": recipes.dkd.beta,
        "distill.dkd_warmup_steps": recipes.dkd.warmup_steps,
    }


def method_overrides(recipes: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
    """The config fields (dotted name -> value) that select `method` with the reference values
    of `recipes`; InputError for an unknown method."""
    if method == "ce":
        unit_task = {"distill.task_weight": 1.0}
        return {
            **kd_losses(recipes, 0.0),
            **unit_task,
            **SUMMED,
            "aggregation.sum.weights": (1.0, 0.0),
        }
    if method == "kd":
        return {**kd_losses(recipes, 0.0), **SUMMED}
    if method == "kd_feature":
        return {**kd_losses(recipes, recipes.feature_weight), **SUMMED}
    if method == "dkd":
        return {**dkd_losses(recipes), **SUMMED}
    if method == "dot":
        return {
            **kd_losses(recipes, 0.0),
            "aggregator": "dot",
            "aggregation.dot.delta": recipes.dot.delta,
            "student.optimizer": "sgd",
            "student.learning_rate": recipes.dot.learning_rate,
        }
    if method in METHODS:
        return {**kd_losses(recipes, recipes.feature_weight), "aggregator": method}
    raise invalid("method", method, f"one of {', '.join(METHODS)}")
