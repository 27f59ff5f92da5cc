"""Measurements of compiled steps for the benchmark: median step time, XLA's memory plan
of the step and the device's peak bytes, FLOP counts and the FLOP floor ratio, and the
aggregation's own cost.

Times are medians over repeated calls of one compiled executable, after compilation and
warm-up calls, with every output blocked on, so they measure the device work of a step and
not tracing, compilation or dispatch queues.
"""

import functools
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mokd_jax import aggregation
from mokd_jax import state as state_lib
from mokd_jax.state import TrainState

WARMUP_STEPS = 2
AGGREGATION_REPEATS = 20


def block(tree: Any) -> None:
    jax.tree.map(lambda leaf: leaf.block_until_ready(), tree)


def timed_call(compiled, state: TrainState, args: tuple, batch: tuple) -> tuple[float, TrainState]:
    """(Seconds of one call with every output blocked on, the new state)."""
    start = time.perf_counter()
    state, metrics = compiled(state, *args, *batch)
    block((state, metrics))
    return time.perf_counter() - start, state


def warmed_up(compiled, state: TrainState, args: tuple, batch: tuple) -> TrainState:
    """The state after WARMUP_STEPS untimed calls."""
    for _ in range(WARMUP_STEPS):
        state = timed_call(compiled, state, args, batch)[1]
    return state


def mode_row(
    step: Callable, state: TrainState, args: tuple, batch: tuple, steps: int
) -> dict[str, Any]:
    """A benchmark mode's row (`interleaved_mode_rows`' for this one mode)."""
    return interleaved_mode_rows({"mode": (step, state, args, batch)}, steps)["mode"]


def interleaved_mode_rows(
    runs: Mapping[str, tuple[Callable, TrainState, tuple, tuple]],
    steps: int,
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, dict[str, Any]]:
    """Benchmark rows for several modes, `runs[mode]` = (step, state, args, batch): the
    median seconds per step, images/s (the batch's leading dimension), the device's peak
    bytes so far and the compiled step's `compiled_memory`.

    Each step is compiled with its state donated (as in training, so each call consumes
    the previous call's state) and warmed up (WARMUP_STEPS calls) before the clock starts;
    then each of the `steps` rounds calls every mode once, so that a change in the
    machine's load slows all modes alike. For steps that take tens of seconds on a shared
    machine, one mode timed after another can land in different minutes of load: the
    RetinaNet benchmark's `mokd` / `kd` came out 1.79 and 1.40 in two such runs
    (docs/benchmarks.md). `report(line)` gets each round's times."""
    compiled, memories, states, times = {}, {}, {}, {}
    for mode, (step, state, args, batch) in runs.items():
        report(f"[{mode}] compiling and warming up")
        compiled[mode] = jax.jit(step, donate_argnums=0).lower(state, *args, *batch).compile()
        memories[mode] = compiled_memory(compiled[mode])
        states[mode] = warmed_up(compiled[mode], state, args, batch)
        times[mode] = []
    for round_index in range(steps):
        for mode, (_, _, args, batch) in runs.items():
            seconds, states[mode] = timed_call(compiled[mode], states[mode], args, batch)
            times[mode].append(seconds)
        line = ", ".join(f"{mode} {times[mode][-1]:.3f} s" for mode in runs)
        report(f"round {round_index + 1}/{steps}: {line}")
    rows = {}
    for mode, (_, _, _, batch) in runs.items():
        seconds = statistics.median(times[mode])
        rows[mode] = {
            "step_time_s": seconds,
            "images_per_s": len(jax.tree.leaves(batch)[0]) / seconds,
            "peak_bytes": peak_bytes(),
            "compiled_memory": memories[mode],
        }
    return rows


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's memory plan of a compiled step (None where the backend has none): the bytes of
    its arguments, outputs, temporaries and of the outputs aliased to (donated) arguments,
    and the peak they imply, arguments + outputs - aliased + temporaries: every buffer the
    step holds at once at most. Unlike the allocator's `memory_stats`, it exists on every
    backend, CPU included, and counts the one step alone."""
    try:
        stats = compiled.memory_analysis()
        memory = {
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
            "alias_bytes": int(stats.alias_size_in_bytes),
        }
    except (AttributeError, NotImplementedError, TypeError):
        return None
    memory["peak_bytes"] = (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
    )
    return memory


def tree_bytes(tree: Any) -> int:
    """The bytes of a pytree's arrays (or shape-dtype structs)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def peak_bytes() -> int | None:
    """The device's peak allocation so far; None where the backend reports none (CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def cost_flops(cost: Any) -> float:
    """FLOPs from `Compiled.cost_analysis()`, which is a dict or, in older jax, a list of
    dicts (one per program)."""
    if isinstance(cost, Mapping):
        return float(cost.get("flops", 0.0))
    return sum(cost_flops(entry) for entry in cost)


def forward_flops(model, image_shape: tuple[int, ...], batch_size: int) -> float:
    """XLA's FLOP count of one eval-mode forward pass, from shapes only (nothing runs)."""
    images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
    variables = jax.eval_shape(
        functools.partial(state_lib.init_model, model, image_shape), jax.random.key(0)
    )
    forward = functools.partial(model.apply, train=False)
    return cost_flops(jax.jit(forward).lower(variables, images).compile().cost_analysis())


def models_flop_floor(teacher, student, image_shape: tuple[int, ...], batch_size: int) -> float:
    """`flop_floor_ratio` of two models' eval-mode forward passes on a batch."""
    return flop_floor_ratio(
        forward_flops(teacher, image_shape, batch_size),
        forward_flops(student, image_shape, batch_size),
    )


def flop_floor_ratio(teacher_flops: float, student_flops: float) -> float:
    """(F_t + 5 F_s) / (F_t + 3 F_s): MoKD's two student backwards against one, with a
    backward counted as two forwards."""
    return (teacher_flops + 5 * student_flops) / (teacher_flops + 3 * student_flops)


def random_rows(params: Any, num_objectives: int, seed: int = 0) -> Any:
    """K-stacked standard normal float32 gradients shaped like `params`, drawn by NumPy on
    the host: the update's cost does not depend on the values, and one host generator
    draws a ResNet-18's K x 11M values in a fraction of a second, where `jax.random` per
    leaf compiles a sampler for each leaf shape first (4 to 6 s on 2 CPU cores)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: rng.standard_normal((num_objectives, *leaf.shape), np.float32), params
    )


def aggregation_time(params: Any, num_objectives: int, hparams: Mapping[str, Any]) -> float:
    """Median seconds of the jitted `mokd` update alone on random K-stacked gradients shaped
    like `params` (the aggregation's own cost, without the backward passes)."""
    tx = aggregation.get(
        "mokd", num_objectives=num_objectives, shared=state_lib.shared_mask, **hparams
    )
    rows = jax.device_put(random_rows(params, num_objectives))
    losses = jnp.linspace(1.0, 2.0, num_objectives)
    state = tx.init(params)
    update = jax.jit(
        lambda grads, state, params, losses: tx.update(grads, state, params, losses=losses)
    )
    compiled = update.lower(rows, state, params, losses).compile()
    block(compiled(rows, state, params, losses))
    times = []
    for _ in range(AGGREGATION_REPEATS):
        start = time.perf_counter()
        block(compiled(rows, state, params, losses))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
