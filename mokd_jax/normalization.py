"""Input normalisation, a property of each network: the per-channel mean and std (of
pixels scaled to [0, 1]) that the network was trained with.

A converted teacher keeps its source's statistics (torchvision and timm: ImageNet's;
RepDistiller and mdistiller CIFAR models: CIFAR-100's); a network trained here takes its
dataset's standard ones (`for_dataset`). Teacher and student may differ: each network's
`Normalization` maps the same uint8 batch to its own inputs inside the jitted step, and is
saved in its checkpoint's identity (`to_identity` / `from_identity`), so a checkpoint
always says how it must be fed.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mokd_jax.errors import invalid


class Normalization(NamedTuple):
    """Per-channel statistics of [0, 1] pixels: inputs are (pixels / 255 - mean) / std.

    One value per field applies to every channel (grayscale data); three are R, G, B.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""torchvision's and timm's ImageNet statistics (`IMAGENET_DEFAULT_MEAN/STD`)."""

CIFAR100 = Normalization(mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))
"""RepDistiller's and mdistiller's CIFAR-100 statistics."""

CIFAR10 = Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
"""CIFAR-10's per-channel statistics."""

UNIT = Normalization(mean=(0.5,), std=(0.25,))
"""Fixed constants for datasets without published statistics (the bundled digits, npz
files): about [-2, 2] for any pixel."""

_BY_DATASET = {"imagenet2012": IMAGENET, "cifar100": CIFAR100, "cifar10": CIFAR10}
PRESETS = {"imagenet": IMAGENET, "cifar100": CIFAR100, "cifar10": CIFAR10, "unit": UNIT}
"""The names a config or `mokd-convert --input_normalization` may give instead of values."""
IDENTITY_FIELD = "input_normalization"
_SYNTAX = (
    f"'' (automatic), one of {', '.join(PRESETS)}, or 'MEAN/STD' with one value per channel "
    "separated by commas, e.g. '0.485,0.456,0.406/0.229,0.224,0.225' or '0.5/0.25'"
)


def for_dataset(dataset: str) -> Normalization:
    """The standard statistics of a dataset (`UNIT` for those without any)."""
    return _BY_DATASET.get(dataset, UNIT)


def apply(normalization: Normalization, images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 (or float pixel-valued) images [..., C] -> float32 model inputs.

    Pure jnp, so it runs inside a jitted step; the statistics broadcast over the last axis.
    """
    mean = jnp.asarray(normalization.mean, jnp.float32)
    std = jnp.asarray(normalization.std, jnp.float32)
    return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def check(field: str, normalization: Sequence[Sequence[float]]) -> Normalization:
    """A `Normalization` from (mean, std) sequences, or a one-line InputError on `field`:
    both of one length (1 or 3), finite, every std positive."""
    try:
        mean, std = (tuple(float(value) for value in part) for part in normalization)
    except (TypeError, ValueError):
        raise invalid(field, normalization, "(mean, std): two sequences of numbers") from None
    return _checked(field, normalization, mean, std)


def _checked(
    field: str, shown: Any, mean: tuple[float, ...], std: tuple[float, ...]
) -> Normalization:
    """`Normalization(mean, std)`, or the InputError on `field` showing the value `shown`."""
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise invalid(field, shown, "mean and std of one length, 1 or 3 channels")
    if not all(math.isfinite(value) for value in mean + std):
        raise invalid(field, shown, "finite numbers")
    if min(std) <= 0:
        raise invalid(field, shown, "every std > 0")
    return Normalization(mean, std)


def parse(field: str, text: str) -> Normalization | None:
    """A config or command-line value: '' (None: the caller's automatic choice), a name of
    `PRESETS`, or explicit 'MEAN/STD' (comma-separated per-channel values), or a one-line
    InputError on `field`.

    One string rather than two lists, so that one ml_collections override sets it:
    `--config.teacher.input_normalization=0.5,0.5,0.5/0.25,0.25,0.25` needs no quoting.
    """
    if not isinstance(text, str):
        raise invalid(field, text, _SYNTAX)
    if text in ("", *PRESETS):
        return PRESETS.get(text)
    mean, _, std = text.partition("/")  # no '/': std is '', which float() refuses
    try:
        mean, std = (tuple(float(value) for value in part.split(",")) for part in (mean, std))
    except ValueError:
        raise invalid(field, text, _SYNTAX) from None
    return _checked(field, text, mean, std)


def spell(normalization: Normalization) -> str:
    """The value `parse` reads back as `normalization`: its preset name, else 'MEAN/STD'."""
    for name, preset in PRESETS.items():
        if preset == normalization:
            return name
    return "/".join(",".join(repr(value) for value in part) for part in normalization)


def check_channels(field: str, normalization: Normalization, channels: int) -> None:
    """Raises InputError unless the statistics fit images of `channels` channels: one value
    for every channel, or one per channel."""
    if len(normalization.mean) not in (1, channels):
        raise invalid(
            field,
            spell(normalization),
            f"statistics for {channels}-channel images: 1 or {channels} values each",
        )


def to_identity(normalization: Normalization) -> dict[str, dict[str, list[float]]]:
    """The identity entry (JSON-ready) that records how a checkpoint's network is fed."""
    return {IDENTITY_FIELD: {"mean": list(normalization.mean), "std": list(normalization.std)}}


def from_identity(identity: Mapping[str, Any], source: str) -> Normalization:
    """The `Normalization` saved in a checkpoint identity; a one-line InputError naming
    `source` (the checkpoint's directory) when it has none or an unreadable one."""
    saved = identity.get(IDENTITY_FIELD)
    if not isinstance(saved, Mapping) or set(saved) != {"mean", "std"}:
        raise invalid(
            IDENTITY_FIELD,
            saved,
            f"the checkpoint at {source} must record the input statistics its network was "
            "trained on ({'mean': [...], 'std': [...]}); convert or export it again with "
            "this version (`mokd-convert --input_normalization=...` sets them)",
        )
    return check(f"{source}: {IDENTITY_FIELD}", (saved["mean"], saved["std"]))
