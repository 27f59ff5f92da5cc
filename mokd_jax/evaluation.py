"""Top-1 and top-5 accuracy of a network over a dataset's evaluation split."""

import functools

import jax
import numpy as np

from mokd_jax import data, parallel
from mokd_jax.normalization import Normalization
from mokd_jax.steps import correct_predictions


def evaluate(
    model, variables, dataset, batch_size: int, mesh, inputs: Normalization
) -> dict[str, float]:
    """Top-1 and top-5 accuracy over every evaluation example exactly once, the network
    fed through its `inputs` statistics.

    Every process reads the whole evaluation split and feeds its own rows of each batch to
    the jitted evaluation step (`steps.correct_predictions`); padded rows are masked out.
    """
    rows = data.process_slice(batch_size, jax.process_index(), jax.process_count())
    sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
        functools.partial(correct_predictions, model=model, inputs=inputs),
        in_shardings=(parallel.variables_sharding(variables), sharding, sharding, sharding),
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
