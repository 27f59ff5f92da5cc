"""Teachers from PyTorch: a torch state dict -> the Flax variables of a mokd_jax model.

Convertible (`mokd_jax.torch_layouts.NAMES`, where their key layouts are): torchvision's
resnet18/34/50/101 and mobilenet_v2, timm's DeiT / ViT
(deit_tiny, deit_small and their aliases vit_tiny, vit_small; fused qkv) and regnety_160
(timm's, as DeiT's teacher), mdistiller's ImageNet mobilenet_v1, and every model of the
RepDistiller / mdistiller CIFAR zoo (`models.CIFAR_NAMES`: the teachers of their released
`cifar_teachers` checkpoints and the students). Every convertible model names its Flax
variables after the torch keys (see each model module's docstring), so one generic rule set
converts them all:
  * the torch key of a Flax variable is its module path with its family's `Renames`
    applied (`layer1_0/downsample_conv` -> `layer1.0.downsample.0`), then its leaf name
    (`_TORCH_LEAF`: kernel and scale -> weight, mean -> running_mean, var -> running_var);
  * kernels change layout (`_KERNEL_PERMUTATIONS`: conv OIHW -> HWIO, Linear's (out, in) ->
    Dense's (in, out)), everything else is copied as is;
  * torch's num_batches_tracked has no counterpart and is dropped.
The conversion is strict: every Flax variable must find its key with the right shape and
every torch key must be used, otherwise a one-line InputError names the key, the shapes
and the arch, so a state dict of another architecture is refused, never half-loaded.

`read_state_dict` reads `.safetensors` (no torch needed) or anything `torch.save` wrote
(torch needed), unwrapping the common containers ({'state_dict': ...}, {'model': ...}) and
DataParallel's 'module.' prefix; `convert` builds the variables and the identity that
`checkpoint.export_variables` saves with them (model, classes and the input statistics the
source trained it on, which the trainer feeds the teacher with); `write` saves both where
the trainer's `teacher.checkpoint_dir` reads them. `to_torch` is the inverse (what
`mokd-export` writes): Flax variables back to the torch state dict of the same layout.
"""

import functools
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mokd_jax import checkpoint, models, normalization
from mokd_jax.errors import invalid
from mokd_jax.torch_layouts import Path, kernel_permutation, layout, torch_key

StateDict = Mapping[str, np.ndarray]


_IGNORED_SUFFIX = "num_batches_tracked"
# The image size that shapes the variables of models without an `image_size` of their own
# (the CNNs: any size does); `jax.eval_shape` makes it free.
_IMAGE_SIZE = 224


def torch_shapes(arch: str, abstract_variables: Any) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """torch key -> (Flax path, the shape torch stores it in) for every Flax variable: what
    a state dict of `arch` must hold, and nothing more (num_batches_tracked aside)."""
    shapes = {}
    for path, leaf in traverse_util.flatten_dict(abstract_variables).items():
        permutation = kernel_permutation(path, len(leaf.shape))
        shape = tuple(leaf.shape)
        if permutation is not None:  # torch axis i is Flax axis permutation.index(i)
            shape = tuple(shape[permutation.index(i)] for i in range(len(shape)))
        shapes[torch_key(arch, path)] = (path, shape)
    return shapes


def to_flax(arch: str, state_dict: StateDict, abstract_variables: Any) -> dict:
    """The Flax variables (shaped and typed like `abstract_variables`, e.g. from
    `jax.eval_shape` of the model's init) holding the torch weights of `state_dict`.

    Strict both ways, with a one-line InputError naming the key, its shapes and `arch`;
    checked in the order that best names a state dict of another model: a shape mismatch
    (in the state dict's order), a missing key, an unused key.
    """
    expected = torch_shapes(arch, abstract_variables)
    for key, value in state_dict.items():
        if key in expected and np.shape(value) != expected[key][1]:
            raise invalid(
                f"state dict key {key!r}",
                np.shape(value),
                f"{arch} needs its shape to be {expected[key][1]}",
            )
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise invalid(
            "arch",
            arch,
            f"the state dict has no {missing[0]!r} {expected[missing[0]][1]} that {arch} "
            f"needs ({len(missing)} missing keys)",
        )
    unused = [k for k in state_dict if k not in expected and not k.endswith(_IGNORED_SUFFIX)]
    if unused:
        raise invalid(
            f"state dict key {unused[0]!r}",
            np.shape(state_dict[unused[0]]),
            f"{arch} has no such parameter ({len(unused)} unused keys)",
        )
    flat_abstract = traverse_util.flatten_dict(abstract_variables)
    flat = {}
    for key, (path, _) in expected.items():
        value = np.asarray(state_dict[key])
        permutation = kernel_permutation(path, value.ndim)
        if permutation is not None:
            value = value.transpose(permutation)
        flat[path] = jnp.asarray(value, dtype=flat_abstract[path].dtype)
    return traverse_util.unflatten_dict(flat)


def to_torch(arch: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The torch state dict of `arch` holding Flax `variables` (`params`, `batch_stats`):
    the exact inverse of `to_flax`, every key named by `torch_key` and every kernel put back
    in torch's layout.

    torch's BatchNorm also keeps `num_batches_tracked`, which `load_state_dict(strict=True)`
    requires and Flax does not count: it is written as 0 for each BatchNorm (torch reads it
    only when a BatchNorm has momentum=None, a cumulative average, which none of these
    models uses).
    """
    layout(arch)
    state_dict = {}
    for path, leaf in traverse_util.flatten_dict(dict(variables)).items():
        value = np.asarray(leaf)
        permutation = kernel_permutation(path, value.ndim)
        if permutation is not None:
            value = value.transpose(np.argsort(permutation))
        state_dict[torch_key(arch, path)] = np.ascontiguousarray(value)
        if path[0] == "batch_stats" and path[-1] == "mean":
            state_dict[torch_key(arch, (*path[:-1], _IGNORED_SUFFIX))] = np.array(0, np.int64)
    return state_dict


def num_classes(arch: str, state_dict: StateDict) -> int:
    """The class count of the state dict's classifier (the first dim of its weight)."""
    head_name = models.get(arch, 2).head_name  # a class attribute: any class count does
    head = torch_key(arch, ("params", head_name, "kernel"))
    if head not in state_dict:
        raise invalid("arch", arch, f"the state dict has no classifier weight {head!r}")
    return int(np.shape(state_dict[head])[0])


def source_inputs(arch: str) -> normalization.Normalization:
    """The input statistics `arch`'s published checkpoints were trained on: CIFAR-100's for
    the RepDistiller / mdistiller CIFAR models (`models.CIFAR_NAMES`), ImageNet's for the
    torchvision and timm models."""
    return normalization.CIFAR100 if arch in models.CIFAR_NAMES else normalization.IMAGENET


def identity(
    arch: str, classes: int, inputs: normalization.Normalization | None = None
) -> dict[str, Any]:
    """What a converted teacher is saved with: architecture, classes and input statistics
    (`inputs`, by default `source_inputs(arch)`), as the trainer exports its own networks."""
    inputs = inputs or source_inputs(arch)
    return {"model": arch, "num_classes": classes, **normalization.to_identity(inputs)}


def convert(
    arch: str, state_dict: StateDict, inputs: normalization.Normalization | None = None
) -> tuple[dict, dict]:
    """(variables, identity) of the mokd_jax model `arch` holding `state_dict`: what
    `checkpoint.export_variables` saves and the trainer checks against its teacher; the
    identity records `inputs` (default: the statistics of `arch`'s source, `source_inputs`),
    which the trainer then feeds the teacher with."""
    classes = num_classes(arch, state_dict)
    model = models.get(arch, classes)
    init = functools.partial(model.init, train=False)
    size = getattr(model, "image_size", _IMAGE_SIZE)  # a ViT takes exactly its own
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    abstract_variables = jax.eval_shape(init, jax.random.key(0), images)
    return to_flax(arch, state_dict, abstract_variables), identity(arch, classes, inputs)


def unwrap(loaded: Any, source: str) -> dict[str, Any]:
    """The state dict inside what `torch.load` returned: descends into 'state_dict' / 'model'
    (training scripts' checkpoints) and drops DataParallel's 'module.' prefix."""
    while isinstance(loaded, Mapping):
        inner = [loaded[k] for k in ("state_dict", "model") if isinstance(loaded.get(k), Mapping)]
        if not inner:
            break
        loaded = inner[0]
    if not isinstance(loaded, Mapping) or not loaded:
        raise invalid("input", source, "a state dict: a non-empty dict of parameter tensors")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key.removeprefix("module."): value for key, value in loaded.items()}
    return dict(loaded)


def _read_torch(path: str) -> dict[str, np.ndarray]:
    """A file `torch.save` wrote, loaded without running pickled code (weights_only)."""
    try:
        import torch
    except ImportError:
        raise invalid(
            "input", path, "reading a torch file needs PyTorch: pip install torch"
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError):
        raise invalid(
            "input",
            path,
            "a state dict saved by torch.save(model.state_dict()), which torch.load("
            "weights_only=True) reads (not a pickled model, nor a file of another kind)",
        ) from None
    state_dict = unwrap(loaded, path)
    if not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise invalid("input", path, "a state dict holding only tensors")
    # numpy has no bfloat16 tensor conversion: floats go through float32, which the Flax
    # variables are anyway.
    return {
        key: (value.float() if value.is_floating_point() else value).numpy()
        for key, value in state_dict.items()
    }


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict in `path` as numpy arrays: `.safetensors` through safetensors (bfloat16
    included: jax's ml_dtypes gives numpy the type), anything else through torch.load."""
    if not os.path.isfile(path):
        raise invalid("input", path, "an existing .pth or .safetensors file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return unwrap(load_file(path), path)
    return _read_torch(path)


def check_output(directory: str, overwrite: bool) -> None:
    """Raises InputError when `directory` holds something (an empty directory aside) that
    writing there would destroy and `overwrite` is not set."""
    occupied = os.path.lexists(directory) and not (
        os.path.isdir(directory) and not os.listdir(directory)
    )
    if occupied and not overwrite:
        raise invalid("output", directory, "a new or empty directory (or pass --overwrite)")


def write(directory: str, variables: dict, identity: dict, overwrite: bool = False) -> None:
    """Saves `variables` with `identity` as an exported checkpoint at `directory`, readable
    by `checkpoint.load_variables` and the trainer's `teacher.checkpoint_dir`.

    Something already at `directory` (an empty directory aside) is replaced only when
    `overwrite`, and never left half-written: the checkpoint is written beside it first and
    swapped in by renames, so a failure leaves the old content in place.
    """
    directory = os.path.abspath(directory)
    check_output(directory, overwrite)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    old = staging + ".old"
    try:
        checkpoint.export_variables(staging, variables, identity, step=0)
        if os.path.lexists(directory):
            os.rename(directory, old)
        os.rename(staging, directory)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(directory):
            os.rename(old, directory)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)
