"""Evaluation over a dataset: top-1 and top-5 counted over every example exactly once, one
compilation per evaluator, and the chance-level rule."""

import dataclasses

import jax
import numpy as np
import pytest

from mokd_jax import data, evaluation, models, normalization, parallel, state, steps
from mokd_jax.evaluation import evaluate


def test_evaluate_counts_top1_and_top5_over_every_example_once():
    dataset = data.load("digits")
    images, labels = dataset.test_images[:37], dataset.test_labels[:37]  # padded last batch
    model = models.get("cnn_small", num_classes=10)
    variables = state.init_model(model, images.shape[1:], jax.random.key(3))
    logits = np.asarray(model.apply(variables, normalization.apply(normalization.UNIT, images)))
    ranks = (logits > logits[np.arange(37), labels][:, None]).sum(-1)
    subset = dataclasses.replace(dataset, test_images=images, test_labels=labels)
    mesh = parallel.make_mesh(fsdp=1)
    result = evaluate(model, variables, subset, 16, mesh, normalization.UNIT)
    assert result["test_accuracy"] == pytest.approx(np.mean(ranks == 0))
    assert result["test_top5_accuracy"] == pytest.approx(np.mean(ranks < 5))


def test_an_evaluator_compiles_once_for_repeated_evaluations(monkeypatch):
    traces = []

    def counting(*args, **kwargs):
        traces.append(1)
        return steps.correct_predictions(*args, **kwargs)

    monkeypatch.setattr(evaluation, "correct_predictions", counting)
    dataset = data.load("digits")
    model = models.get("cnn_small", num_classes=10)
    evaluator = evaluation.make_evaluator(
        model, dataset, 128, parallel.make_mesh(fsdp=1), normalization.UNIT
    )
    variables = [state.init_model(model, dataset.image_shape, jax.random.key(k)) for k in (0, 1)]
    counts = [evaluator(v) for v in variables]
    assert len(traces) == 1
    assert all(c.examples == len(dataset.test_labels) for c in counts)
    assert counts[0] != counts[1]  # it evaluates the variables it is given


@pytest.mark.parametrize(
    "top1, examples, classes, expected",
    [
        (36, 360, 10, True),  # exactly chance
        (53, 360, 10, True),  # 14.7%: within 3 sigma (4.74 points) of 10%
        (54, 360, 10, False),  # 15.0%
        (200, 360, 10, False),
        (70, 50_000, 1000, True),  # 0.14% against ImageNet's 0.1% + 0.04%
        (80, 50_000, 1000, False),
    ],
)
def test_at_chance_is_within_three_binomial_sigmas_of_guessing(top1, examples, classes, expected):
    counts = evaluation.Counts(top1=top1, top5=top1, examples=examples)
    assert evaluation.at_chance(counts, classes) is expected
