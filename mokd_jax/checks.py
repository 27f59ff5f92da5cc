"""Input checks shared by every module: each raises the one-line InputError that names the
field, the value and what is allowed (see `mokd_jax.errors`)."""

import math
import numbers
from collections.abc import Sequence
from typing import Any

from mokd_jax.errors import invalid


def check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    """Raises InputError unless `value` is one of `choices`."""
    if value not in choices:
        raise invalid(field, value, f"one of {', '.join(choices)}")


def check_int(field: str, value: Any, minimum: int) -> None:
    """Raises InputError unless `value` is an integer (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise invalid(field, value, f"an integer >= {minimum}")


def check_positive(field: str, value: Any) -> None:
    """Raises InputError unless `value` is a finite real number > 0."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value > 0):
        raise invalid(field, value, "a finite number > 0")


def check_nonnegative(field: str, value: Any) -> None:
    """Raises InputError unless `value` is a finite real number >= 0."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value >= 0):
        raise invalid(field, value, "a finite number >= 0")


def check_range(
    field: str, value: Any, low: float, high: float, *, open_high: bool = False
) -> None:
    """Raises InputError unless `value` is a real number in [low, high] ([low, high) when
    `open_high`)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    inside = real and low <= value and (value < high if open_high else value <= high)
    if not inside:
        raise invalid(field, value, f"a number in [{low:g}, {high:g}{')' if open_high else ']'}")
