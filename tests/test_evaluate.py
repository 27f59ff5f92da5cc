"""mokd_jax.evaluate (`mokd-evaluate`): an exported network evaluated on a config's dataset,
its model, classes and input statistics read from the checkpoint's identity."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from mokd_jax import checkpoint, data, evaluate, models, normalization, state
from mokd_jax.errors import InputError

ODD_INPUTS = normalization.Normalization(mean=(0.3,), std=(0.2,))


def write_network(directory, num_classes=10, inputs=ODD_INPUTS, claimed_model="cnn_small"):
    """An exported, untrained cnn_small with the identity a run writes, which names
    `claimed_model`."""
    module = models.get("cnn_small", num_classes=num_classes)
    variables = state.init_model(module, (8, 8, 1), jax.random.key(1))
    identity = {"model": claimed_model, "num_classes": num_classes}
    if inputs is not None:
        identity.update(normalization.to_identity(inputs))
    checkpoint.export_variables(str(directory), variables, identity, step=0)
    return module, variables


@pytest.mark.slow
def test_evaluates_with_the_model_and_input_statistics_of_the_identity(tmp_path):
    """Slow: compiles an evaluation (10-15 s on 2 shared cores)."""
    module, variables = write_network(tmp_path / "net")
    result = evaluate.evaluate_checkpoint(default.get_config(), str(tmp_path / "net"))
    dataset = data.load_configured(default.get_config())
    inputs = normalization.apply(ODD_INPUTS, dataset.test_images)
    logits = np.asarray(module.apply(variables, inputs, train=False))
    ranks = (logits > logits[np.arange(len(logits)), dataset.test_labels][:, None]).sum(-1)
    assert result["test_examples"] == 360 and result["model"] == "cnn_small"
    assert result["test_accuracy"] == pytest.approx(np.mean(ranks == 0))
    assert result["test_top5_accuracy"] == pytest.approx(np.mean(ranks < 5))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_classes": 12}, "for the 10 classes of digits; it holds a cnn_small for 12"),
        ({"inputs": None}, "input_normalization=None.*must record the input statistics"),
        ({"claimed_model": "resnet18"}, "variables of a resnet18 .* has shape"),
        ({"claimed_model": "nope"}, "whose identity names its model .* model='nope'"),
    ],
)
def test_a_network_that_does_not_fit_the_dataset_is_refused_in_one_line(tmp_path, fields, message):
    write_network(tmp_path / "net", **fields)
    with pytest.raises(InputError, match=message) as error:
        evaluate.evaluate_checkpoint(default.get_config(), str(tmp_path / "net"))
    assert "\n" not in str(error.value)


def test_a_directory_without_an_exported_network_is_refused(tmp_path):
    with pytest.raises(InputError, match="checkpoint_dir=.*an exported network"):
        evaluate.evaluate_checkpoint(default.get_config(), str(tmp_path / "missing"))


@pytest.mark.slow
def test_the_command_prints_and_writes_json_and_exits_2_on_bad_input(tmp_path):
    """Subprocesses (each imports JAX: seconds)."""
    write_network(tmp_path / "net")
    write_network(tmp_path / "other", num_classes=12)
    command = [sys.executable, "-m", "mokd_jax.evaluate", "--config=default"]
    good = subprocess.run(
        [*command, f"--checkpoint_dir={tmp_path}/net", f"--output={tmp_path}/out.json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr[-2000:]
    with open(tmp_path / "out.json") as f:
        result = json.load(f)
    assert f"top-1 {result['test_accuracy']:.2%}" in good.stdout
    bad = subprocess.run(
        [*command, f"--checkpoint_dir={tmp_path}/other"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "12 classes" in errors[0]
