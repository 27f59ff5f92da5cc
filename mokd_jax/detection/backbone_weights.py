"""ImageNet classifiers as the starting backbones of RetinaNets trained here.

A detector trained in a run (the student, or a teacher trained in WORKDIR/teacher) starts
from the classifier in `ROLE.backbone_weights` ('' = random initialisation): a directory
that `mokd-convert` wrote from a torchvision checkpoint, e.g.

    mokd-convert --arch=resnet18 --input=resnet18-f37072fd.pth --output=backbones/resnet18

Choices:
  * The classifier's variables go into the RetinaNet's `body` as they are, the head's
    aside: `body` is the same zoo model, run through `encode` only, so it holds every
    variable of the classifier but its head (`head_name`). The file is checked against the
    classifier its identity names (`identities.shape_mismatch`), and that name against
    `ROLE.model`, so a checkpoint of another architecture is refused, never half-loaded.
  * The backbone is loaded after the state is created, by a jitted step that takes it as
    an argument (`start_from_backbone`): a closure would embed the weights in the compiled
    program as constants (hundreds of MB for a ResNet-101). The optimizer state is then
    initialised again from the loaded parameters, so it is what `tx.init` gives for them,
    whatever the optimizer.
  * Only a fresh state (step 0) is loaded into: a resumed phase's checkpoint already holds
    the trained backbone, and the file is not read again.
  * The classifier's input statistics (its identity's, ImageNet's for torchvision) must be
    the role's (`ROLE.input_normalization`): a backbone fed otherwise than it was trained
    sees shifted inputs from the first step. A mismatch is refused rather than fixed
    silently, since the role's statistics are also saved with the detector.
"""

import functools
from typing import Any

import jax
import ml_collections
import optax
from etils import epath

from mokd_jax import checkpoint, models, normalization
from mokd_jax.errors import invalid
from mokd_jax.identities import shape_mismatch
from mokd_jax.state import TrainState

# The image shape the classifier's variables are checked at; convolutional backbones take
# any, and `jax.eval_shape` makes the check free.
_IMAGE_SHAPE = (224, 224, 3)
# The RetinaNet's submodule that holds the backbone (`retinanet.RetinaNet.body`).
BODY = "body"


def check_identity(
    role: str,
    directory: str,
    backbone: str,
    inputs: normalization.Normalization,
    saved: dict | None,
) -> None:
    """Raises the InputError naming the field unless `saved` (the identity of the
    checkpoint at `directory`, None without one) is a `backbone` classifier trained on the
    role's input statistics `inputs`."""
    field = f"{role}.backbone_weights"
    converted = f"a {backbone} classifier converted by mokd-convert --arch={backbone}"
    if saved is None:
        raise invalid(
            field, directory, f"'' (random initialisation) or a directory holding {converted}"
        )
    if saved.get("task") == "detection":
        raise invalid(
            field,
            directory,
            f"{converted}; it holds a RetinaNet (a trained detector is a teacher.checkpoint_dir)",
        )
    if saved.get("model") != backbone:
        raise invalid(
            field, directory, f"{converted} ({role}.model); it holds a {saved.get('model')!r}"
        )
    saved_inputs = normalization.from_identity(saved, directory)
    if saved_inputs != inputs:
        raise invalid(
            f"{role}.input_normalization",
            normalization.spell(inputs),
            f"{normalization.spell(saved_inputs)!r}, the statistics the backbone at "
            f"{directory} ({field}) was trained on",
        )


def read_backbone(
    role: str, directory: str, backbone: str, inputs: normalization.Normalization
) -> dict:
    """{'params', 'batch_stats'} of the converted `backbone` classifier at `directory`
    (`role`'s backbone_weights), its head left out; a one-line InputError naming the field
    when the directory holds no checkpoint, a detector, another model, variables of
    other shapes, or a classifier trained on other input statistics than `inputs` (the
    role's)."""
    saved = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
    check_identity(role, directory, backbone, inputs, saved)
    classifier = models.get(backbone, saved["num_classes"])
    variables = checkpoint.load_variables(directory)
    mismatch = shape_mismatch(variables, classifier, _IMAGE_SHAPE)
    if mismatch is not None:
        raise invalid(
            f"{role}.backbone_weights",
            directory,
            f"the variables of the {backbone} classifier its identity names; {mismatch}",
        )
    params = {
        name: value for name, value in variables["params"].items() if name != classifier.head_name
    }
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}


def detector_params(params: dict, role: str) -> dict:
    """The RetinaNet's parameters in a phase state's `params`: the teacher's are the
    detector's, the student's sit beside its projectors' under 'student' (`mokd_jax.state`)."""
    return params["student"] if role == "student" else params


def with_backbone(
    state: TrainState, backbone: dict, tx: optax.GradientTransformation, role: str
) -> TrainState:
    """`state` whose detector's body holds `backbone` ({'params', 'batch_stats'} of
    `read_backbone`), its optimizer state initialised again for the new parameters. Pure:
    jitted by `start_from_backbone`."""
    detector = {**detector_params(state.params, role), BODY: backbone["params"]}
    params = {**state.params, "student": detector} if role == "student" else detector
    return state.replace(
        params=params,
        batch_stats={**state.batch_stats, BODY: backbone["batch_stats"]},
        opt_state=tx.init(params),
    )


def start_from_backbone(
    config: ml_collections.ConfigDict,
    role: str,
    inputs: normalization.Normalization,
    state: TrainState,
    shardings: Any,
    tx: optax.GradientTransformation,
) -> TrainState:
    """The phase's initial `state` (placed in `shardings`) starting from
    `ROLE.backbone_weights` when that is set and the state is fresh (step 0), else `state`
    as it is; `inputs` are the role's input statistics and `tx` its optimizer."""
    directory = config[role].backbone_weights
    if not directory or int(state.step) > 0:
        return state
    backbone = read_backbone(role, directory, config[role].model, inputs)
    # Placed as the state's body is, so that the jitted step moves nothing between devices.
    body_shardings = {
        "params": detector_params(shardings.params, role)[BODY],
        "batch_stats": shardings.batch_stats[BODY],
    }
    backbone = jax.device_put(backbone, body_shardings)
    load = jax.jit(
        functools.partial(with_backbone, tx=tx, role=role),
        out_shardings=shardings,
        donate_argnums=0,
    )
    return load(state, backbone)
