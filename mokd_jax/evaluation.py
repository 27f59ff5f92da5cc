"""Top-1 and top-5 accuracy of a network over a dataset's evaluation split.

`make_evaluator` compiles the evaluation step once per network, so that a phase evaluating
its network every few steps (and once more at the end) pays one compilation; `evaluate` is
the one-off form. `at_chance` tells a network that does no better than guessing.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from mokd_jax import data, parallel
from mokd_jax.normalization import Normalization
from mokd_jax.steps import correct_predictions


class Counts(NamedTuple):
    """Correct top-1 and top-5 predictions over `examples` evaluation examples."""

    top1: int
    top5: int
    examples: int

    def accuracies(self) -> dict[str, float]:
        """The summary's and TensorBoard's keys: `test_accuracy` (top-1) and
        `test_top5_accuracy`."""
        return {
            "test_accuracy": self.top1 / self.examples,
            "test_top5_accuracy": self.top5 / self.examples,
        }


def make_evaluator(
    model, dataset, batch_size: int, mesh, inputs: Normalization
) -> Callable[[dict], Counts]:
    """A function of the network's variables counting its correct predictions over every
    evaluation example exactly once, the network fed through its `inputs` statistics.

    The step (`steps.correct_predictions`) is jitted here, once: calling the evaluator
    again with variables of the same shapes and shardings reuses the compiled program. The
    variables keep the shardings they have (a train state's, or `parallel.place_variables`).
    Every process reads the whole evaluation split and feeds its own rows of each batch;
    padded rows are masked out.
    """
    rows = data.process_slice(batch_size, jax.process_index(), jax.process_count())
    sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
        functools.partial(correct_predictions, model=model, inputs=inputs),
        out_shardings=parallel.replicated(mesh),
    )

    def evaluator(variables: dict) -> Counts:
        total = np.zeros(3, np.int64)
        for batch in dataset.eval_batches(batch_size):
            local = tuple(array[rows] for array in batch)
            total += np.asarray(
                jax.device_get(step(variables, *parallel.global_batch(local, sharding)))
            )
        return Counts(*(int(count) for count in total))

    return evaluator


def evaluate(
    model, variables, dataset, batch_size: int, mesh, inputs: Normalization
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of one network (`make_evaluator`, called once)."""
    return make_evaluator(model, dataset, batch_size, mesh, inputs)(variables).accuracies()


CHANCE_SIGMAS = 3.0


def at_chance(counts: Counts, num_classes: int) -> bool:
    """Whether top-1 is no better than guessing: within `CHANCE_SIGMAS` binomial standard
    deviations of 1/num_classes over this many examples.

    The margin is the sampling noise of a guesser's accuracy, sqrt(p (1 - p) / n) with
    p = 1/num_classes: 3 sigmas is 4.7 points on the digits' 360 test images (chance 10%)
    and 0.13 points on ImageNet's 50,000 (chance 0.1%), so a network that learned anything
    passes while one fed the wrong inputs (whose predictions collapse onto a few classes)
    does not.
    """
    chance = 1.0 / num_classes
    margin = CHANCE_SIGMAS * math.sqrt(chance * (1.0 - chance) / counts.examples)
    return counts.top1 / counts.examples <= chance + margin
