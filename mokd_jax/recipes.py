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

SUMMED_BASELINES = ("ce", "kd", "kd_feature", "dkd")
"""The baselines that add their objectives with `aggregation.sum.weights` (the others name
their aggregator)."""


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


def distill_fields(recipes: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
    """The `distill` fields of `method`: DKD's loss for dkd, else KD's, and the feature loss
    for kd_feature and the aggregators only. Every method sets every recipe field (DKD's
    alpha, beta and warm-up too, inert under KD), so that a method's config does not depend
    on the method the config selected before."""
    logit = recipes.dkd if method == "dkd" else recipes.kd
    with_features = method == "kd_feature" or method not in BASELINES
    return {
        "distill.logit_loss": "dkd" if method == "dkd" else "kd",
        "distill.temperature": logit.temperature,
        "distill.task_weight": 1.0 if method == "ce" else logit.task_weight,
        "distill.logit_weight": 1.0 if method == "dkd" else recipes.kd.logit_weight,
        "distill.feature_weight": recipes.feature_weight if with_features else 0.0,
        "distill.dkd_alpha": recipes.dkd.alpha,
        "distill.dkd_beta": recipes.dkd.beta,
        "distill.dkd_warmup_steps": recipes.dkd.warmup_steps,
    }


def method_overrides(recipes: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
    """The config fields (dotted name -> value) that select `method` with the reference values
    of `recipes`; InputError for an unknown method."""
    if method not in METHODS:
        raise invalid("method", method, f"one of {', '.join(METHODS)}")
    overrides = {
        **distill_fields(recipes, method),
        "aggregator": "sum" if method in SUMMED_BASELINES else method,
        "aggregation.sum.weights": (1.0, 0.0) if method == "ce" else (1.0, 1.0),
        "aggregation.dot.delta": recipes.dot.delta,
    }
    if method == "dot":
        overrides.update(
            {"student.optimizer": "sgd", "student.learning_rate": recipes.dot.learning_rate}
        )
    return overrides
