"""mokd_jax.measurement: the FLOP floor formula and XLA cost-analysis parsing."""

import pytest

from mokd_jax import measurement


def test_flop_floor_ratio_formula():
    assert measurement.flop_floor_ratio(1.0, 0.0) == 1.0
    assert measurement.flop_floor_ratio(0.0, 1.0) == pytest.approx(5 / 3)
    assert measurement.cost_flops([{"flops": 2.0}, {"flops": 3.0}]) == 5.0
    assert measurement.cost_flops({"flops": 4.0}) == 4.0
