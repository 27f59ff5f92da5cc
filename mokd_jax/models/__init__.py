"""Model registry: `get(name, num_classes)` returns an unbound Flax Linen module."""

import functools
from collections.abc import Callable

import flax.linen as nn

from mokd_jax.errors import invalid
from mokd_jax.models.cnn import ConvNet

__all__ = ["NAMES", "ConvNet", "get"]

# cnn_large (~205k params) teaches cnn_small (~19k, about 10x fewer): fewer channels
# and one block per stage instead of two.
_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn_large": functools.partial(ConvNet, widths=(32, 64, 96), blocks=(2, 2, 2)),
    "cnn_small": functools.partial(ConvNet, widths=(16, 32, 48), blocks=(1, 1, 1)),
}
NAMES = tuple(_MODELS)


def get(name: str, num_classes: int) -> nn.Module:
    """The model `name` (one of NAMES) with a `num_classes`-way head."""
    if name not in _MODELS:
        raise invalid("model", name, f"one of {', '.join(NAMES)}")
    if num_classes < 2:
        raise invalid("num_classes", num_classes, "an integer >= 2")
    return _MODELS[name](num_classes=num_classes)
