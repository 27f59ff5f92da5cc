"""Helper for the tests of what a step that pulls one forward pass back once per objective
keeps alive (not a test file)."""

import jax
import jax.numpy as jnp

from mokd_jax import steps
from mokd_jax.measurement import compiled_memory


def pullback_peaks(objectives, params, compiler_options=None) -> tuple[int, int]:
    """XLA's planned peak bytes of one pullback of the two `objectives` summed and of two
    pullbacks, one per objective, as the trainer's `steps.row_gradients` takes them.
    `objectives(params)` -> ([2] losses, aux); `compiler_options`: XLA options for these
    two compilations only (None: the process's)."""

    def peak(rows):
        pullbacks = lambda params: steps.row_gradients(objectives, params, lambda _: rows)[0]  # noqa: E731
        compiled = jax.jit(pullbacks).lower(params).compile(compiler_options=compiler_options)
        return compiled_memory(compiled)["peak_bytes"]

    return peak(jnp.ones((1, 2))), peak(jnp.eye(2))
