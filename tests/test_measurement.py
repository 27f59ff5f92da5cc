"""mokd_jax.measurement: the FLOP floor formula, XLA cost-analysis parsing, the memory plan
and the interleaved timing of several modes."""

import jax
import jax.numpy as jnp
import pytest

from mokd_jax import measurement


def test_flop_floor_ratio_formula():
    assert measurement.flop_floor_ratio(1.0, 0.0) == 1.0
    assert measurement.flop_floor_ratio(0.0, 1.0) == pytest.approx(5 / 3)
    assert measurement.cost_flops([{"flops": 2.0}, {"flops": 3.0}]) == 5.0
    assert measurement.cost_flops({"flops": 4.0}) == 4.0


def test_compiled_memory_implies_the_peak_of_a_donating_step():
    """A step that donates its [1000] float32 argument and returns one of that shape: XLA
    plans the output into the argument (aliased), so the implied peak is argument +
    output - alias + temporaries."""
    x = jnp.ones(1000)
    compiled = jax.jit(lambda x: (x * 2, x.sum()), donate_argnums=0).lower(x).compile()
    memory = measurement.compiled_memory(compiled)
    assert memory["argument_bytes"] == 4000
    assert memory["output_bytes"] >= 4004  # the new x and the sum
    assert memory["alias_bytes"] == 4000
    expected = (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
    )
    assert memory["peak_bytes"] == expected


def test_tree_bytes_counts_every_leaf_in_its_dtype():
    tree = {"a": jnp.zeros((2, 3)), "b": [jax.ShapeDtypeStruct((4,), jnp.bfloat16)]}
    assert measurement.tree_bytes(tree) == 6 * 4 + 4 * 2


def test_interleaved_mode_rows_warm_up_every_mode_then_call_each_once_per_round():
    """Two modes whose steps record their calls (a host callback): each is warmed up,
    then the rounds alternate them; each row has the benchmark's fields."""
    calls = []

    def step_of(name):
        def step(state, increment, batch):
            jax.debug.callback(lambda: calls.append(name))
            return state + increment, {"sum": batch.sum()}

        return step

    batch = jnp.ones((3, 2))
    runs = {
        "a": (step_of("a"), jnp.zeros(()), (jnp.ones(()),), (batch,)),
        "b": (step_of("b"), jnp.zeros(()), (2 * jnp.ones(()),), (batch,)),
    }
    lines = []
    rows = measurement.interleaved_mode_rows(runs, steps=3, report=lines.append)

    warm_up = measurement.WARMUP_STEPS
    assert calls == ["a"] * warm_up + ["b"] * warm_up + ["a", "b"] * 3
    assert [line.split(":")[0] for line in lines if line.startswith("round")] == [
        "round 1/3",
        "round 2/3",
        "round 3/3",
    ]
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        assert row["step_time_s"] > 0
        assert row["images_per_s"] == pytest.approx(3 / row["step_time_s"])
        assert row["compiled_memory"]["argument_bytes"] > 0
