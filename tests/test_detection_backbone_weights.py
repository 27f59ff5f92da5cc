"""mokd_jax.detection.backbone_weights: a torchvision ImageNet classifier, converted by
`mokd_jax.convert` as `mokd-convert` does, as the starting backbone of a RetinaNet.

torchvision's resnet18 (the real one, through tests/torchvision_shim.py) gets random
weights and BatchNorm statistics (`randomized`); after loading, our RetinaNet's C3-C5 must
be its layer2-layer4 outputs on the same input, max |ours - torch| / max |torch| <= 1e-4
(float32 on both sides, different summation orders; a misplaced variable moves them by
O(1)). The states are the phases' in shape but zeros (`fresh_state`), so that no
network but the compared backbone compiles; about 5 s on 2 idle cores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import detection
from mokd_jax import checkpoint, convert, normalization
from mokd_jax.detection.backbone_weights import read_backbone, start_from_backbone
from mokd_jax.detection.retinanet import RetinaNet
from mokd_jax.detection.steps import example_pyramid
from mokd_jax.errors import InputError
from mokd_jax.networks import build_detection_networks, build_retinanet
from mokd_jax.state import TrainState, create_student_state, create_teacher_state

torch = pytest.importorskip("torch")
from torch_references import numpy_state_dict, randomized  # noqa: E402  (needs torch)
from torchvision_shim import import_torchvision  # noqa: E402  (needs torch)

torchvision = import_torchvision()

RTOL = 1e-4
CLASSES = 4
IMAGES = np.random.default_rng(0).normal(size=(2, 96, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """(torchvision's randomized resnet18, the directory of its conversion)."""
    model = randomized(torchvision.models.resnet18())
    variables, identity = convert.convert("resnet18", numpy_state_dict(model))
    directory = str(tmp_path_factory.mktemp("backbones") / "resnet18")
    convert.write(directory, variables, identity)
    return model, directory


def torch_c3_c5(model, images: np.ndarray) -> list[np.ndarray]:
    """layer2, layer3 and layer4 outputs of a torchvision ResNet, NHWC."""
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2))
        x = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        features = []
        for layer in (model.layer2, model.layer3, model.layer4):
            x = layer(x)
            features.append(x.numpy().transpose(0, 2, 3, 1))
    return features


def smoke_config(directory: str):
    """configs/detection.py's smoke pair (resnet18 RetinaNets) with both roles starting
    from `directory` on ImageNet-normalised inputs."""
    config = detection.get_config("smoke")
    for role in ("teacher", "student"):
        config[role].backbone_weights = directory
        config[role].input_normalization = "imagenet"
    return config


def fresh_state(create) -> TrainState:
    """The state `create(key)` makes, as numpy zeros: its shapes without running it."""
    abstract = jax.eval_shape(create, jax.random.key(0))
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)


def one_device(state):
    """`state`'s shardings on one device, as `loop.initial_state` gives on one CPU."""
    return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)


def test_a_student_backbone_computes_torchvisions_features(resnet18):
    torch_model, directory = resnet18
    config = smoke_config(directory)
    networks = build_detection_networks(
        config,
        CLASSES,
        teacher_input=normalization.IMAGENET,
        student_input=normalization.IMAGENET,
    )
    tx = optax.sgd(0.1, momentum=0.9)
    state = fresh_state(
        functools.partial(
            create_student_state,
            networks,
            IMAGES.shape[1:],
            tx,
            example_features=example_pyramid,
        )
    )
    state = start_from_backbone(
        config, "student", normalization.IMAGENET, state, one_device(state), tx
    )
    variables = {"params": state.params["student"], "batch_stats": state.batch_stats}
    backbone = jax.jit(
        functools.partial(networks.student.apply, method=RetinaNet.backbone_features)
    )
    ours = backbone(variables, IMAGES)
    for mine, theirs in zip(ours, torch_c3_c5(torch_model, IMAGES), strict=True):
        assert mine.shape == theirs.shape
        assert np.abs(mine - theirs).max() <= RTOL * np.abs(theirs).max()
    assert "fc" not in state.params["student"]["body"]  # the classifier head is left out
    assert set(state.params) == {"student", "projector"}


def test_a_teacher_trained_here_starts_from_the_converted_variables(resnet18):
    _, directory = resnet18
    config = smoke_config(directory)
    model = build_retinanet(config, "teacher", CLASSES)
    tx = optax.sgd(0.1)
    state = fresh_state(functools.partial(create_teacher_state, model, (64, 64, 3), tx))
    state = start_from_backbone(
        config, "teacher", normalization.IMAGENET, state, one_device(state), tx
    )
    converted = checkpoint.load_variables(directory)
    del converted["params"]["fc"]
    loaded = {"params": state.params["body"], "batch_stats": state.batch_stats["body"]}
    assert jax.tree.structure(loaded) == jax.tree.structure(converted)
    jax.tree.map(np.testing.assert_array_equal, loaded, converted)
    assert {"fpn", "classification_head", "regression_head"} < set(state.params)


def test_no_backbone_or_a_resumed_state_is_left_as_it_is():
    config = detection.get_config("smoke")
    fresh = TrainState(jnp.zeros((), jnp.int32), {"body": {}}, {}, {}, ())
    assert start_from_backbone(config, "student", None, fresh, None, None) is fresh
    config.student.backbone_weights = "/nowhere"  # not read: the checkpoint has the backbone
    resumed = fresh.replace(step=jnp.ones((), jnp.int32))
    assert start_from_backbone(config, "student", None, resumed, None, None) is resumed


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(
        InputError,
        match=r"^student.backbone_weights='.*nothing' is not allowed: '' \(random initialisation\)"
        r" or a directory holding a resnet18 classifier converted by mokd-convert --arch=resnet18",
    ):
        read_backbone("student", str(tmp_path / "nothing"), "resnet18", normalization.IMAGENET)


@pytest.mark.parametrize(
    "role, backbone, inputs, message",
    [
        (
            "teacher",
            "resnet101",
            normalization.IMAGENET,
            r"^teacher.backbone_weights=.* a resnet101 classifier .*\(teacher.model\); it "
            r"holds a 'resnet18'$",
        ),
        (
            "student",
            "resnet18",
            normalization.UNIT,
            r"^student.input_normalization='unit' is not allowed: 'imagenet', the statistics "
            r"the backbone at .* \(student.backbone_weights\) was trained on$",
        ),
    ],
)
def test_another_architecture_or_other_inputs_are_refused(
    resnet18, role, backbone, inputs, message
):
    _, directory = resnet18
    with pytest.raises(InputError, match=message):
        read_backbone(role, directory, backbone, inputs)


IMAGENET_IDENTITY = {"model": "resnet18", "num_classes": 2}
IMAGENET_IDENTITY.update(normalization.to_identity(normalization.IMAGENET))


@pytest.mark.parametrize(
    "identity, params, message",
    [
        (
            {**IMAGENET_IDENTITY, "task": "detection"},
            {"x": np.zeros(1)},
            r"it holds a RetinaNet .*teacher.checkpoint_dir\)$",
        ),
        (  # the identity names a resnet18, the variables are not one
            IMAGENET_IDENTITY,
            {"conv1": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}},
            r"resnet18.* has shape .*the model needs",
        ),
    ],
)
def test_a_checkpoint_that_is_no_such_classifier_is_refused(tmp_path, identity, params, message):
    checkpoint.export_variables(str(tmp_path), {"params": params}, identity, 1)
    with pytest.raises(InputError, match=r"^student.backbone_weights=.*" + message):
        read_backbone("student", str(tmp_path), "resnet18", normalization.IMAGENET)
