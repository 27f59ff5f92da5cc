"""Evaluation over a dataset: top-1 and top-5 counted over every example exactly once."""

import dataclasses

import jax
import numpy as np
import pytest

from mokd_jax import data, models, normalization, parallel, state
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
