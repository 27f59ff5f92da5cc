"""mokd_jax.detection.retinanet: the module's contract on a resnet18 RetinaNet (output shapes
and order, anchors per level, float32 outputs, one compilation for every batch, frozen
backbone norms, the prior on the initial scores), its input checks and the trainable mask.
Parity with torchvision's RetinaNets is tests/test_detection_convert.py's.

Big models are only traced (`jax.eval_shape`). The one real init draws its keys with 'rbg':
threefry's init of the ~20M parameters compiles for about 30 s on 2 CPU cores, rbg's for a
few (the parameters' distributions are the same, their draws differ).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mokd_jax.detection.retinanet import (
    NUM_ANCHORS,
    RetinaNet,
    pyramid_shapes,
    trainable_mask,
    upsample_nearest,
)
from mokd_jax.errors import InputError

CLASSES = 5
# Sides that are no multiple of the largest stride: the levels halve with rounding up
# (9x13, 5x7, 3x4, 2x2, 1x1) and the FPN upsamples by other factors than 2.
IMAGES = (2, 72, 100, 3)


def random_images(shape=IMAGES, seed=0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.fixture(scope="module")
def initialised():
    """(model, variables, apply) of a v1 resnet18 RetinaNet, `apply` jitted. Every test
    passes `train` positionally, as `test_one_compilation_serves_every_batch_and_mode`
    must, so that they all share one compilation."""
    model = RetinaNet("resnet18", CLASSES)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), random_images())
    return model, variables, jax.jit(model.apply)


def abstract_variables(model: nn.Module) -> dict:
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def test_outputs_follow_the_pyramid(initialised):
    model, variables, apply = initialised
    outputs = apply(variables, random_images(), False)
    shapes = pyramid_shapes(*IMAGES[1:3])
    assert shapes == ((9, 13), (5, 7), (3, 4), (2, 2), (1, 1))
    assert outputs.level_shapes == shapes  # static, through jit
    anchors = sum(height * width * NUM_ANCHORS for height, width in shapes)
    assert outputs.class_logits.shape == (2, anchors, CLASSES)
    assert outputs.box_regression.shape == (2, anchors, 4)
    assert {name: feature.shape for name, feature in outputs.features.items()} == {
        f"p{level}": (2, height, width, 256)
        for level, (height, width) in zip(range(3, 8), shapes, strict=True)
    }
    assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}


def test_the_prior_sets_every_initial_score(initialised):
    """torchvision's init: the head convs' normal(0, 0.01) weights leave the logits within
    a few thousandths of their bias, -log(99), so every anchor starts at a foreground
    probability of 0.01, and the box deltas near 0 (within 0.1: every initial box within
    about 10% of its anchor)."""
    _, variables, apply = initialised
    outputs = apply(variables, random_images(seed=1), False)
    scores = jax.nn.sigmoid(outputs.class_logits)
    assert abs(float(scores.mean()) - 0.01) < 1e-4
    np.testing.assert_allclose(scores, 0.01, atol=1e-3)
    assert float(jnp.abs(outputs.box_regression).max()) < 0.1


def test_one_compilation_serves_every_batch_and_mode(initialised):
    """The backbone's BatchNorms use their running averages in training too: `train=True`
    gives the eval outputs, updates no statistics (none is mutable here, so an update
    would raise) and, traced alike, reuses the compilation."""
    _, variables, apply = initialised
    images = random_images(seed=2)
    evaluated = apply(variables, images, False)
    compilations = apply._cache_size()
    trained = apply(variables, images, True)
    apply(variables, random_images(seed=3), False)
    assert apply._cache_size() == compilations
    jax.tree.map(np.testing.assert_array_equal, trained, evaluated)


def test_outputs_are_float32_when_computing_in_bfloat16():
    model = RetinaNet("resnet18", CLASSES, variant="v2", dtype="bfloat16")
    outputs = jax.eval_shape(model.apply, abstract_variables(model), random_images())
    assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"backbone": "vgg13"}, r"backbone='vgg13' is not allowed: one of resnet18, .*mobilenet"),
        ({"variant": "v3"}, r"variant='v3' is not allowed: one of v1, v2"),
        ({"num_classes": 0}, r"num_classes=0 is not allowed: an integer >= 1"),
        ({"prior_probability": 1.0}, r"prior_probability=1\.0 is not allowed: .*\[0, 1\)"),
        ({"dtype": "float16"}, r"dtype='float16' is not allowed: one of 'float32', 'bfloat16'"),
        ({"width": 0}, r"width=0 is not allowed: an integer >= 1"),
        ({"head_depth": -1}, r"head_depth=-1 is not allowed: an integer >= 0"),
        ({"variant": "v2", "width": 48}, r"width=48 is not allowed: a multiple of 32"),
    ],
)
def test_a_bad_configuration_is_refused(fields, message):
    model = RetinaNet(**{"backbone": "resnet18", "num_classes": CLASSES, **fields})
    with pytest.raises(InputError, match=message):
        abstract_variables(model)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_width_and_head_depth_shape_the_fpn_and_the_heads(variant):
    """A light detector: every FPN and head conv `width` channels wide, `head_depth` convs
    before each head's output conv; the outputs keep their shapes."""
    model = RetinaNet("resnet18", CLASSES, variant=variant, width=32, head_depth=1)
    variables = abstract_variables(model)
    params = variables["params"]
    for name in ("inner_blocks_0", "layer_blocks_2", "p6", "p7"):
        assert params["fpn"][name]["kernel"].shape[-1] == 32
    for head, outputs in (("classification_head", CLASSES), ("regression_head", 4)):
        convs = [name for name in params[head] if name.startswith("conv_")]
        assert convs == ["conv_0"]
        assert params[head]["conv_0"]["kernel"].shape == (3, 3, 32, 32)
        output = "cls_logits" if outputs == CLASSES else "bbox_reg"
        assert params[head][output]["kernel"].shape == (3, 3, 32, NUM_ANCHORS * outputs)
    outputs = jax.eval_shape(model.apply, variables, random_images((1, 64, 64, 3)))
    assert outputs.class_logits.shape[-1] == CLASSES


def test_pyramid_shapes_round_up():
    """COCO's 800x1333 training size: strides 8 .. 128, each side rounded up."""
    assert pyramid_shapes(800, 1333) == ((100, 167), (50, 84), (25, 42), (13, 21), (7, 11))


def test_nearest_upsampling_reads_torchs_rows():
    """torch's nearest: output i reads input floor(i * in / out); 3 -> 5 rows read rows 0,
    0, 1, 1, 2 and 2 -> 4 columns repeat each column twice."""
    x = jnp.arange(6.0).reshape(1, 3, 2, 1)  # x[0, r, c, 0] = 2 r + c
    expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3], [4, 4, 5, 5]])
    np.testing.assert_array_equal(upsample_nearest(x, (5, 4))[0, :, :, 0], expected)


# --- the trainable mask ---------------------------------------------------------------------


def _trained_paths(mask: dict) -> set[str]:
    return {"/".join(path) for path, trains in traverse_util.flatten_dict(mask).items() if trains}


@pytest.fixture(scope="module")
def resnet18_params():
    model = RetinaNet("resnet18", CLASSES)
    return model, abstract_variables(model)["params"]


def test_the_default_mask_freezes_the_stem_the_first_stage_and_every_backbone_norm(
    resnet18_params,
):
    model, params = resnet18_params
    trained = _trained_paths(trainable_mask(model, params))
    body = {path for path in trained if path.startswith("body/")}
    assert body == {
        f"body/layer{stage}_{block}/{conv}/kernel"
        for stage in (2, 3, 4)
        for block in (0, 1)
        for conv in ("conv1", "conv2", *(["downsample_conv"] if block == 0 else []))
    }
    everything = {"/".join(path) for path in traverse_util.flatten_dict(params)}
    rest = {path for path in everything if not path.startswith("body/")}
    assert trained - body == rest and any(path.startswith("fpn/") for path in rest)


@pytest.mark.parametrize(
    "layers, stem, first_stage, last_stage",
    [(0, False, False, False), (4, False, True, True), (5, True, True, True)],
)
def test_trainable_layers_count_back_from_the_last_stage(
    resnet18_params, layers, stem, first_stage, last_stage
):
    model, params = resnet18_params
    mask = trainable_mask(model, params, trainable_layers=layers)
    body = mask["body"]
    assert (body["conv1"]["kernel"], body["layer1_0"]["conv1"]["kernel"]) == (stem, first_stage)
    assert body["layer4_1"]["conv2"]["kernel"] == last_stage
    assert body["bn1"]["scale"] is False and mask["regression_head"]["bbox_reg"]["kernel"]


def test_a_mobilenet_v2s_first_stage_holds_its_stem():
    model = RetinaNet("mobilenet_v2", CLASSES)
    params = abstract_variables(model)["params"]
    default, everything = (trainable_mask(model, params, layers) for layers in (3, 5))
    assert default["body"]["features_3"]["project"]["conv"]["kernel"] is False
    assert default["body"]["features_4"]["project"]["conv"]["kernel"] is True
    assert everything["body"]["features_0"]["conv"]["kernel"] is True
    assert everything["body"]["features_0"]["bn"]["scale"] is False


def test_a_trainable_layers_outside_0_to_5_is_refused(resnet18_params):
    with pytest.raises(InputError, match=r"trainable_layers=6 is not allowed: .*\[0, 5\]"):
        trainable_mask(*resnet18_params, trainable_layers=6)


def test_the_mask_freezes_parameters_through_optax(resnet18_params):
    """The use its docstring gives: frozen parameters get zero updates, the rest train."""
    model, abstract = resnet18_params
    params = jax.tree.map(lambda leaf: jnp.zeros(()), abstract)  # the structure is enough
    mask = trainable_mask(model, params)
    optimizer = optax.multi_transform({True: optax.sgd(1.0), False: optax.set_to_zero()}, mask)
    gradients = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(gradients, optimizer.init(params), params)
    moved = jax.tree.map(lambda update: bool(jnp.any(update != 0)), updates)
    assert moved == mask
