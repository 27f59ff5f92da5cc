import pytest

from mokd_jax import convolution_timings

pytest.importorskip("torch")


@pytest.mark.slow
def test_every_shape_is_timed_in_both_frameworks_and_totalled_by_count():
    results = convolution_timings.measure(image_size=32, batch_size=1, repeats=1)
    rows = results["rows"]
    assert [row["name"] for row in rows] == [
        shape["name"] for shape in convolution_timings.resnet18_convolutions(32)
    ]
    assert sum(row["count"] for row in rows) == 20  # a ResNet-18's convolutions
    for key in convolution_timings.TIMES:
        assert all(row[key] > 0 for row in rows)
        assert results["totals_ms"][key] == pytest.approx(
            sum(row[key] * row["count"] for row in rows)
        )
