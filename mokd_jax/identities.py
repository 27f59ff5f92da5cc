"""What a run's checkpoints are and what they must match.

Fingerprints (`data_fingerprint`, `student_fingerprint`): the fields that shape a phase's
trajectory, saved with its checkpoints, so that a resume with other settings is refused.
Identities (`exported_identity`): what an exported network is (architecture, classes,
input statistics), checked when a teacher is restored (`check_teacher_identity`,
`check_teacher_fits`). And the modules and input statistics of the networks trained here
(`dataset_model`, `dataset_inputs`).
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from mokd_jax import data, normalization
from mokd_jax.errors import invalid
from mokd_jax.networks import build_model
from mokd_jax.optimizers import aggregator_hparams
from mokd_jax.state import init_model


def data_fingerprint(config: ml_collections.ConfigDict, dataset) -> dict:
    """The data fields that shape a trajectory.

    Not the mesh: a run may resume on another number of devices. The number of processes
    only for the streamed TFDS datasets: each process streams its own shard of the split
    in an order of its own, so the batches after a resume on another process count are
    not those of an uninterrupted run (examples of the epoch in progress would be
    repeated or skipped); such a resume is refused. The in-memory datasets draw the same
    global batches for any process count and resume anywhere.
    """
    streamed = {"process_count": jax.process_count()} if dataset.name in data.TFDS_NAMES else {}
    # Detection's generated shapes set: its image counts when the config sets them (kept
    # out when empty, so that runs written before the field existed still resume).
    shapes = {"shapes_images": list(config.shapes_images)} if config.get("shapes_images") else {}
    return {
        **streamed,
        **shapes,
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "num_classes": dataset.num_classes,
        "image_shape": list(dataset.image_shape),
        "recipe": config.recipe,
        "augment": config.augment.to_dict(),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "dtype": config.dtype,
    }


def exported_identity(model: str, num_classes: int, inputs: normalization.Normalization) -> dict:
    """What an exported network is saved with: architecture, classes and the input
    statistics it was trained on (`convert.identity` writes the same for converted
    teachers)."""
    return {"model": model, "num_classes": num_classes, **normalization.to_identity(inputs)}


def check_teacher_identity(
    saved: Mapping[str, Any], config: ml_collections.ConfigDict, num_classes: int, path: str
) -> normalization.Normalization:
    """Checks a teacher checkpoint's identity against the run (model, class count, and the
    input statistics when `teacher.input_normalization` sets them) and returns the
    statistics it was saved with, which the teacher is then fed with."""
    if saved.get("num_classes") != num_classes:
        raise invalid(
            "teacher.num_classes",
            saved.get("num_classes"),
            f"the teacher checkpoint at {path} must have the student's class count {num_classes}",
        )
    if saved.get("model") != config.teacher.model:
        raise invalid(
            "teacher.model",
            config.teacher.model,
            f"the teacher checkpoint at {path} holds a {saved.get('model')!r}",
        )
    inputs = normalization.from_identity(saved, path)
    field = "teacher.input_normalization"
    requested = normalization.parse(field, config.teacher.input_normalization)
    if requested not in (None, inputs):
        raise invalid(
            field,
            config.teacher.input_normalization,
            f"'' or {normalization.spell(inputs)!r}: the teacher checkpoint at {path} was "
            f"trained on inputs normalised with {normalization.spell(inputs)}",
        )
    return inputs


def dataset_model(config: ml_collections.ConfigDict, role: str, dataset):
    """The teacher's or student's module for `dataset`'s classes and image size."""
    return build_model(config, role, dataset.num_classes, dataset.image_shape[0])


def dataset_inputs(
    config: ml_collections.ConfigDict, role: str, dataset
) -> normalization.Normalization:
    """The input statistics of the `role` network trained here on `dataset`: the config's
    `ROLE.input_normalization`, else the dataset's standard ones (`UNIT` for the digits and
    npz files, which have none)."""
    field = f"{role}.input_normalization"
    inputs = normalization.parse(field, config[role].input_normalization)
    inputs = inputs or normalization.for_dataset(dataset.name)
    normalization.check_channels(field, inputs, dataset.image_shape[-1])
    return inputs


def shape_mismatch(variables: Mapping[str, Any], model, image_shape) -> str | None:
    """The first variable whose shape differs between `variables` and `model`'s on images
    of `image_shape` ('NAME has shape S, the model needs T'), or None when they fit."""
    expected = jax.eval_shape(functools.partial(init_model, model, image_shape), jax.random.key(0))
    expected_shapes = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {key: expected[key] for key in ("params", "batch_stats") if key in expected}
        )
    }
    saved_shapes = {
        jax.tree_util.keystr(path): np.shape(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(dict(variables))
    }
    for name in sorted(set(expected_shapes) | set(saved_shapes)):
        if expected_shapes.get(name) != saved_shapes.get(name):
            return (
                f"{name} has shape {saved_shapes.get(name)}, "
                f"the model needs {expected_shapes.get(name)}"
            )
    return None


def check_teacher_fits(variables: Mapping[str, Any], config, dataset, directory: str) -> None:
    """Raises InputError when restored teacher variables do not fit the teacher model on
    this dataset's images (e.g. an RGB ImageNet teacher on grayscale digits), naming the
    first variable whose shape differs, instead of a shape error deep inside Flax."""
    model = dataset_model(config, "teacher", dataset)
    mismatch = shape_mismatch(variables, model, dataset.image_shape)
    if mismatch is not None:
        raise invalid(
            "teacher.checkpoint_dir",
            directory,
            f"variables of a {config.teacher.model} for {dataset.name} images of shape "
            f"{tuple(dataset.image_shape)}; {mismatch}",
        )


def student_fingerprint(
    config: ml_collections.ConfigDict, dataset, teacher_input: normalization.Normalization
) -> dict:
    """The fields that shape the distillation's trajectory, with both networks' input
    statistics (the teacher's may come from its checkpoint rather than the config)."""
    return {
        **data_fingerprint(config, dataset),
        "teacher_input": teacher_input._asdict(),
        "student_input": dataset_inputs(config, "student", dataset)._asdict(),
        **{key: config[key].to_dict() for key in ("teacher", "student", "distill", "projector")},
        "aggregator": config.aggregator,
        "aggregation": aggregator_hparams(config),
        "granularity": config.granularity,
    }
