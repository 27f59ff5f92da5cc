"""mokd_jax.benchmark_report: the memory goal read off the compiled steps' plans."""

from mokd_jax.benchmark_report import extra_memory, format_memory


def row(peak_bytes: int) -> dict:
    return {"compiled_memory": {"peak_bytes": peak_bytes}}


def test_extra_memory_counts_gradient_copies_per_extra_objective():
    modes = {"kd_1bwd": row(1000), "mokd": row(1100), "mokd_separate": row(1250)}
    memory = extra_memory(modes, gradient_bytes=100)
    assert memory["mokd"] == {
        "extra_bytes": 100,
        "extra_gradient_copies": 1.0,
        "extra_objectives": 1,
        "goal_met": True,  # one copy for K = 2: at the allowance
    }
    assert memory["mokd_separate"]["extra_gradient_copies"] == 2.5
    assert memory["mokd_separate"]["goal_met"] is False  # K = 3 allows two copies
    assert "over kd_1bwd: 0.0 MiB = 2.50 gradient copies (goal <= 2: not met)" in "\n".join(
        format_memory(memory)
    )


def test_extra_memory_skips_modes_without_a_plan_or_a_baseline():
    assert "mokd" not in extra_memory({"mokd": row(5)}, gradient_bytes=1)
    no_plan = {"kd_1bwd": row(5), "mokd": {"compiled_memory": None}}
    assert "mokd" not in extra_memory(no_plan, gradient_bytes=1)
