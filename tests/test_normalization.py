"""Tests for mokd_jax.normalization: each network's input statistics."""

import jax
import numpy as np
import pytest

from mokd_jax import normalization
from mokd_jax.errors import InputError


def test_apply_maps_pixels_channel_by_channel_under_jit():
    images = np.array([[[[0, 128, 255]]]], np.uint8)  # one RGB pixel
    out = np.asarray(jax.jit(normalization.apply, static_argnums=0)(normalization.IMAGENET, images))
    expected = (np.array([0, 128, 255]) / 255.0 - np.array(normalization.IMAGENET.mean)) / np.array(
        normalization.IMAGENET.std
    )
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
    assert out.dtype == np.float32


def test_one_value_applies_to_every_channel():
    out = np.asarray(normalization.apply(normalization.UNIT, np.array([0, 255], np.uint8)))
    np.testing.assert_allclose(out, [-2.0, 2.0])


def test_each_dataset_gets_its_standard_statistics():
    assert normalization.for_dataset("imagenet2012") == normalization.IMAGENET
    assert normalization.for_dataset("cifar100") == normalization.CIFAR100
    assert normalization.for_dataset("digits") == normalization.UNIT


def test_identity_round_trips_through_json_lists():
    identity = {"model": "resnet18", **normalization.to_identity(normalization.CIFAR100)}
    assert normalization.from_identity(identity, "DIR") == normalization.CIFAR100


def test_identity_without_the_field_names_the_checkpoint():
    with pytest.raises(InputError, match="input_normalization.*checkpoint at /ckpt"):
        normalization.from_identity({"model": "resnet18"}, "/ckpt")


@pytest.mark.parametrize(
    "value, message",
    [
        (((0.5, 0.5), (0.25,)), "one length"),
        (((0.5,), (0.0,)), "std > 0"),
        (("a", "b"), "two sequences"),
        (((0.1, 0.2), (0.3, 0.4)), "1 or 3 channels"),
    ],
)
def test_check_refuses_bad_statistics_in_one_line(value, message):
    with pytest.raises(InputError, match=message) as raised:
        normalization.check("teacher.input_normalization", value)
    assert "teacher.input_normalization" in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", None),
        ("imagenet", normalization.IMAGENET),
        ("cifar100", normalization.CIFAR100),
        ("unit", normalization.UNIT),
        (
            "0.5,0.4,0.3/0.2,0.25,0.3",
            normalization.Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
        ),
        ("0.5/0.25", normalization.UNIT),
    ],
)
def test_parse_reads_presets_and_explicit_values(text, expected):
    assert normalization.parse("student.input_normalization", text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("imagenet1k", "one of imagenet, cifar100, cifar10, unit, or 'MEAN/STD'"),
        ("0.5", "'MEAN/STD'"),
        ("0.5/a", "'MEAN/STD'"),
        ("0.5,0.5/0.25", "1 or 3 channels"),
        ("0.5/-1", "std > 0"),
        ("inf/1", "finite"),
    ],
)
def test_parse_refuses_other_text_in_one_line_naming_it(text, message):
    with pytest.raises(InputError, match=message) as raised:
        normalization.parse("student.input_normalization", text)
    assert f"student.input_normalization={text!r}" in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "value", [normalization.CIFAR10, normalization.Normalization((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))]
)
def test_spell_is_what_parse_reads_back(value):
    assert normalization.parse("f", normalization.spell(value)) == value


def test_statistics_must_fit_the_images_channels():
    normalization.check_channels("f", normalization.UNIT, 3)  # one value for every channel
    normalization.check_channels("f", normalization.IMAGENET, 3)
    with pytest.raises(InputError, match="f='imagenet'.*1-channel images"):
        normalization.check_channels("f", normalization.IMAGENET, 1)
