"""mokd_jax.identities: the fingerprints a phase's checkpoints are saved and matched with."""

import jax
import numpy as np
import pytest

from configs import default
from mokd_jax import checkpoint, data, identities, normalization
from mokd_jax.errors import InputError


def test_the_student_fingerprint_holds_both_networks_statistics():
    config = default.get_config("smoke")
    config.student.input_normalization = "0.4/0.3"
    fingerprint = identities.student_fingerprint(
        config, data.load("digits"), teacher_input=normalization.CIFAR100
    )
    assert fingerprint["teacher_input"] == normalization.CIFAR100._asdict()
    assert fingerprint["student_input"] == {"mean": (0.4,), "std": (0.3,)}


def test_a_streamed_dataset_resumes_only_on_the_process_count_that_wrote_it(tmp_path, monkeypatch):
    """Each process streams its own TFDS shard: another count would repeat or skip examples
    of the epoch in progress, so the checkpoint is refused; the in-memory datasets draw the
    same global batches on any count and keep no process count in their fingerprint."""
    import tensorflow_datasets as tfds

    config = default.get_config("smoke")
    assert "process_count" not in identities.data_fingerprint(config, data.load("digits"))
    config.dataset = "cifar10"
    with tfds.testing.mock_data(num_examples=4):
        dataset = data.load("cifar10")
    manager = checkpoint.open_manager(str(tmp_path), 1, 1)
    with monkeypatch.context() as patched:
        patched.setattr(jax, "process_count", lambda: 2)
        written_by_two = identities.data_fingerprint(config, dataset)
    checkpoint.save(manager, 1, {"x": np.zeros(1)}, written_by_two, force=True)
    manager.wait_until_finished()
    with pytest.raises(InputError, match="different configuration \\(process_count: 2 -> 1\\)"):
        checkpoint.restore_latest(manager, None, identities.data_fingerprint(config, dataset))


def test_the_shapes_sets_image_counts_shape_the_data_fingerprint_when_set():
    from configs import detection

    config = detection.get_config("smoke")
    digits = data.load("digits")  # the fields read from the dataset do not matter here
    assert identities.data_fingerprint(config, digits)["shapes_images"] == [8, 40]
    config.shapes_images = ()
    assert "shapes_images" not in identities.data_fingerprint(config, digits)
