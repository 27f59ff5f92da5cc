"""Tests for mokd_jax.data.randaugment: each op's contract, its magnitude, the ops PIL has
(timm applies PIL's), the magnitude noise and fill colour, and the policy's dtype, shape,
determinism and apply rate."""

import functools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mokd_jax.data import randaugment, tfds_specs
from mokd_jax.errors import InputError

OPS = {op.__name__.lstrip("_"): op for op in randaugment.OPS}
LEVEL = randaugment.MAGNITUDE / randaugment.MAX_MAGNITUDE
# The ops that take no magnitude; every other op is the identity at magnitude 0.
UNLEVELLED = {"auto_contrast", "equalize", "invert"}
# posterize keeps 4 - int(4 * level) bits, so 4 bits, not all 8, at magnitude 0.
NOT_IDENTITY_AT_ZERO = UNLEVELLED | {"posterize"}


def _image(shape=(24, 20, 3), low=30, high=200, seed=0):
    """Random pixels in [low, high): away from 0 and 255, so that auto_contrast stretches."""
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.uint8)


def _apply(name, image, sign=1.0, level=LEVEL):
    """The op on uint8 pixels, clipped and rounded as `rand_augment` does after each op."""
    out = OPS[name](tf.constant(image, tf.float32), tf.constant(sign), level).numpy()
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def test_ops_are_timms_increasing_list_in_its_order():
    # rand_augment draws an index into OPS: reordering would change every seed's output.
    assert list(OPS) == [
        "auto_contrast",
        "equalize",
        "invert",
        "rotate",
        "posterize",
        "solarize",
        "solarize_add",
        "color",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    ]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_ops_keep_shape_and_range(name, sign):
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (24, 20, 3)), tf.float32)
    out = OPS[name](image, tf.constant(sign), LEVEL).numpy()
    assert out.shape == (24, 20, 3)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= -0.5 and out.max() <= 255.5


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_magnitude_zero_is_the_identity_for_every_levelled_op(name, sign):
    image = _image()
    unchanged = np.array_equal(_apply(name, image, sign, level=0.0), image)
    assert unchanged == (name not in NOT_IDENTITY_AT_ZERO)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_every_op_changes_an_image_at_magnitude_9(name, sign):
    assert not np.array_equal(_apply(name, _image(), sign), _image())


@pytest.mark.parametrize("name", sorted(set(OPS) - UNLEVELLED))
def test_the_sign_matters_only_for_the_ops_timm_negates(name):
    image = _image()
    differs = not np.array_equal(_apply(name, image, -1.0), _apply(name, image, 1.0))
    assert differs == (name not in {"posterize", "solarize", "solarize_add"})


@pytest.mark.parametrize(
    ("name", "pil"),
    [
        ("invert", ImageOps.invert),
        ("equalize", ImageOps.equalize),
        # timm at m=9: 4 - int(0.9 * 4) = 1 bit; threshold 256 - int(0.9 * 256) = 26.
        ("posterize", lambda image: ImageOps.posterize(image, 1)),
        ("solarize", lambda image: ImageOps.solarize(image, 26)),
    ],
)
def test_ops_equal_pils(name, pil):
    for seed, (low, high) in enumerate([(30, 200), (0, 256), (100, 120)]):
        image = _image((17, 23, 3), low, high, seed)
        np.testing.assert_array_equal(_apply(name, image), np.asarray(pil(Image.fromarray(image))))


@pytest.mark.parametrize(
    ("name", "pil"),
    [
        # PIL truncates the stretched values, the op leaves them to rand_augment's rounding.
        ("auto_contrast", lambda image, factor: ImageOps.autocontrast(image)),
        ("color", lambda image, factor: ImageEnhance.Color(image).enhance(factor)),
        ("contrast", lambda image, factor: ImageEnhance.Contrast(image).enhance(factor)),
        ("brightness", lambda image, factor: ImageEnhance.Brightness(image).enhance(factor)),
        ("sharpness", lambda image, factor: ImageEnhance.Sharpness(image).enhance(factor)),
    ],
)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_ops_are_within_one_of_pils(name, pil, sign):
    image = _image((17, 23, 3), 40, 168)
    factor = 1.0 + sign * LEVEL * 0.9  # timm's enhance factor: 1 +- 0.81 at m=9
    expected = np.asarray(pil(Image.fromarray(image), factor), int)
    assert np.abs(_apply(name, image, sign).astype(int) - expected).max() <= 1


def test_solarize_add_adds_99_below_128():
    image = _image((8, 8, 3), 0, 256)
    expected = np.where(image < 128, np.minimum(image.astype(int) + 99, 255), image)
    np.testing.assert_array_equal(_apply("solarize_add", image), expected)


def test_auto_contrast_leaves_a_flat_image_alone():
    image = np.full((6, 5, 3), 77, np.uint8)
    np.testing.assert_array_equal(_apply("auto_contrast", image), image)


@pytest.fixture(scope="module")
def augment():
    """rand_augment traced once for (H, W, 3) images, as tf.data's map runs it."""
    return tf.function(
        randaugment.rand_augment,
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([2], tf.int64),
        ],
    )


def _seed(index):
    return tf.constant([index, 7], tf.int64)


@pytest.mark.parametrize("shape", [(32, 32, 3), (24, 20, 3), (9, 40, 3)])
def test_rand_augment_keeps_dtype_and_shape(augment, shape):
    image = _image(shape, 0, 256)
    for index in range(8):
        out = augment(tf.constant(image), _seed(index)).numpy()
        assert out.dtype == np.uint8 and out.shape == shape


def test_rand_augment_is_a_pure_function_of_the_seed(augment):
    image = tf.constant(_image())
    outputs = [augment(image, _seed(index)).numpy() for index in range(40)]
    for index in (0, 13, 39):
        np.testing.assert_array_equal(augment(image, _seed(index)).numpy(), outputs[index])
    # Eager and traced runs agree, so a test of either speaks for tf.data's map.
    np.testing.assert_array_equal(randaugment.rand_augment(image, _seed(5)).numpy(), outputs[5])
    assert len({output.tobytes() for output in outputs}) > 20


@tf.function(
    input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64)]
)
def _rand_augment_computing_every_op(image, seed):
    """rand_augment's draws, but each layer's op computed whether applied or not and then
    selected: what `rand_augment` computed before it skipped unapplied ops. Traced, as
    `augment` is, for any image size: a trace for one static size may round a geometric op's
    last float bit otherwise."""
    pixels = tf.cast(image, tf.float32)
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, 2)):
        op_seed, sign_seed, apply_seed, level_seed = tf.unstack(
            tf.random.experimental.stateless_split(layer_seed, 4)
        )
        level = randaugment.noisy_level(level_seed, randaugment.MAGNITUDE, 0.5)
        op = tf.random.stateless_uniform([], op_seed, 0, len(randaugment.OPS), tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        augmented = tf.switch_case(
            op, [functools.partial(function, pixels, sign, level) for function in randaugment.OPS]
        )
        applied = tf.random.stateless_uniform([], apply_seed) < 0.5
        pixels = tf.where(applied, tf.round(tf.clip_by_value(augmented, 0.0, 255.0)), pixels)
    return tf.cast(pixels, tf.uint8)


def test_skipping_unapplied_ops_changes_no_pixel(augment):
    image = tf.constant(_image((30, 26, 3), 0, 256))
    for index in range(40):
        expected = _rand_augment_computing_every_op(image, _seed(index))
        np.testing.assert_array_equal(augment(image, _seed(index)).numpy(), expected.numpy())


def test_rand_augment_leaves_about_a_quarter_of_the_images_unchanged(augment):
    # Each of the 2 layers applies its op with probability 0.5: neither does for 1 in 4.
    image = _image()
    unchanged = sum(
        np.array_equal(augment(tf.constant(image), _seed(index)).numpy(), image)
        for index in range(200)
    )
    assert 30 <= unchanged <= 75


@pytest.mark.parametrize("magnitude", [-1, 10.5, "9"])
def test_rand_augment_rejects_a_magnitude_off_timms_scale(magnitude):
    with pytest.raises(InputError, match=f"magnitude={magnitude!r} is not allowed"):
        randaugment.rand_augment(tf.constant(_image()), _seed(0), magnitude=magnitude)


def test_the_deit_recipe_is_rand_augment_m9_mstd05():
    assert tfds_specs.RECIPE_SETTINGS["deit"].augment is randaugment.rand_augment
    assert (randaugment.MAGNITUDE, randaugment.MAGNITUDE_STD) == (9, 0.5)


def _levels(magnitude, magnitude_std, count=2000):
    return np.array(
        [randaugment.noisy_level(_seed(index), magnitude, magnitude_std) for index in range(count)]
    )


def test_magnitude_noise_is_timms_gauss_clipped_to_the_scale():
    # timm: random.gauss(m, 0.5) per op, clipped to [0, 10]; the level is m / 10.
    levels = _levels(9, 0.5)
    assert abs(levels.mean() - 0.9) < 0.005 and abs(levels.std() - 0.05) < 0.005
    assert len(np.unique(levels)) > 1000
    at_top = _levels(10, 0.5, 400)
    assert at_top.max() == 1.0 and 0.4 < (at_top == 1.0).mean() < 0.6
    np.testing.assert_allclose(_levels(9, 0.0, 5), 0.9)


@pytest.mark.parametrize("name", ["posterize", "solarize", "solarize_add", "rotate", "color"])
def test_ops_take_a_tensor_level_as_a_float_one(name):
    image = _image((12, 10, 3), 0, 256)
    np.testing.assert_array_equal(
        _apply(name, image, level=tf.constant(0.7)), _apply(name, image, level=0.7)
    )


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_geometric_ops_fill_with_timms_mean_pixel(name):
    # A flat image: every output pixel is the image's grey, the fill, or a blend of both.
    image = np.full((20, 20, 3), 200, np.uint8)
    out = _apply(name, image, sign=1.0).reshape(-1, 3).astype(float)
    fill = np.array(randaugment.FILL)
    assert (np.abs(out - fill).max(axis=1) == 0).sum() > 20
    weights = (200.0 - out) / (200.0 - fill)  # the fill's share of each pixel, per channel
    np.testing.assert_allclose(weights, weights[:, :1].repeat(3, 1), atol=0.03)
