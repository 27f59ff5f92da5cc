"""The console commands of pyproject's [project.scripts]: each is the `run()` of one command
module, whose flags are defined by `define_flags(flag_values)` (not on import) and parse as
the command line gives them; installed, each answers --help with exit status 0 (mokd_jax.cli)."""

import ast
import importlib
import importlib.metadata
import inspect
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags

from mokd_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMANDS = {
    "mokd-train": ("mokd_jax.main", {"config", "workdir"}),
    "mokd-compare": ("mokd_jax.compare", {"config", "methods", "seeds", "workdir"}),
    "mokd-benchmark": (
        "mokd_jax.benchmark",
        {"teacher", "student", "image_size", "batch_size", "steps", "num_classes"}
        | {"modes", "dtype", "json", "framework"}
        | {"peer_device", "peer_bf16", "peer_channels_last", "peer_compile"}
        | {"task", "fpn_width", "head_depth"},
    ),
    "mokd-pipeline-benchmark": (
        "mokd_jax.pipeline_benchmark",
        {"pipelines", "image_size", "batch_size", "warmup_batches", "batches"}
        | {"source_images", "source_size", "step_rate", "json"},
    ),
    "mokd-convert": (
        "mokd_jax.convert_teacher",
        {"arch", "input", "output", "overwrite", "input_normalization", "bn_epsilon"},
    ),
    "mokd-evaluate": ("mokd_jax.evaluate", {"config", "checkpoint_dir", "output"}),
    "mokd-export": ("mokd_jax.export", {"checkpoint_dir", "output", "overwrite"}),
    "mokd-export-npz": ("mokd_jax.data.export_npz", {"dataset", "data_dir", "out"}),
}


def defined_flags(command: str) -> flags.FlagValues:
    """The command's flags, defined on their own FlagValues (not absl's global FLAGS)."""
    flag_values = flags.FlagValues()
    importlib.import_module(COMMANDS[command][0]).define_flags(flag_values)
    return flag_values


def lists_flags(help_text: str, names: set[str]) -> bool:
    """Whether absl's help text lists every flag of `names` (booleans as --[no]NAME)."""
    return all(f"--{name}:" in help_text or f"--[no]{name}:" in help_text for name in names)


def parse(flag_values: flags.FlagValues, argv: list[str], monkeypatch) -> flags.FlagValues:
    """Parses `argv` as the command line: ml_collections reads --config.* overrides from
    sys.argv."""
    monkeypatch.setattr(sys, "argv", argv)
    flag_values(argv)
    return flag_values


def test_pyproject_scripts_are_the_run_functions_of_the_command_modules(pyproject):
    scripts = pyproject["project"]["scripts"]
    assert scripts == {name: f"{module}:run" for name, (module, _) in COMMANDS.items()}
    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).run)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_defines_its_flags_only_when_asked(command):
    importlib.import_module(COMMANDS[command][0])
    assert not COMMANDS[command][1] & set(flags.FLAGS)  # importing defined none of them
    flag_values = defined_flags(command)
    assert set(flag_values) == COMMANDS[command][1]
    assert lists_flags(flag_values.get_help(), COMMANDS[command][1])


def test_train_flags_take_a_bundled_config_by_name_with_overrides(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name finds the bundled one
    argv = ["mokd-train", "--config=imagenet:smoke", "--config.aggregator=mgda"]
    flag_values = parse(defined_flags("mokd-train"), argv, monkeypatch)
    assert flag_values.config.dataset == "imagenet2012" and flag_values.config.image_size == 32
    assert flag_values.config.aggregator == "mgda"
    assert main.default_workdir(flag_values["config"].config_filename) == "runs/imagenet_smoke"


def test_train_flags_refuse_an_unknown_config_naming_the_bundled_ones(monkeypatch):
    flag_values = defined_flags("mokd-train")
    with pytest.raises(
        flags.IllegalFlagValueError, match="cifar100, coco, default, detection, imagenet"
    ):
        parse(flag_values, ["mokd-train", "--config=nope"], monkeypatch)


def test_compare_flags_parse_methods_seeds_and_a_config_path(monkeypatch):
    config = os.path.join(REPO, "configs", "default.py")
    argv = ["mokd-compare", f"--config={config}:smoke", "--methods=kd,mokd", "--seeds=0,1"]
    flag_values = parse(defined_flags("mokd-compare"), argv, monkeypatch)
    assert flag_values.methods == ["kd", "mokd"] and flag_values.seeds == ["0", "1"]
    assert flag_values.config.student.num_train_steps == 20
    assert flag_values.workdir == "runs/compare"


@pytest.mark.parametrize(
    "command, argv, field, value",
    [
        ("mokd-benchmark", ["--modes=kd,mokd", "--dtype=bfloat16"], "modes", ["kd", "mokd"]),
        ("mokd-convert", ["--arch=resnet18", "--input=a.pth", "--output=out"], "arch", "resnet18"),
        ("mokd-export-npz", ["--out=npz"], "dataset", "digits"),
        (
            "mokd-pipeline-benchmark",
            ["--pipelines=cifar_eval", "--step_rate=9790"],
            "step_rate",
            9790.0,
        ),
        ("mokd-export", ["--checkpoint_dir=d", "--output=f.safetensors"], "overwrite", False),
    ],
)
def test_other_commands_parse_their_flags(monkeypatch, command, argv, field, value):
    flag_values = parse(defined_flags(command), [command, *argv], monkeypatch)
    assert flag_values[field].value == value


def test_installed_entry_points_match_pyproject(pyproject):
    """The installed metadata (`pip install -e .`) is not stale: reinstall after editing
    [project.scripts]."""
    try:
        installed = importlib.metadata.distribution("mokd_jax").entry_points
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mokd_jax is not installed (pip install -e .)")
    scripts = {ep.name: ep.value for ep in installed if ep.group == "console_scripts"}
    assert scripts == pyproject["project"]["scripts"]


def installed_script(command: str) -> str | None:
    """The console script beside this Python (a venv's bin/) first, else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), command)
    return beside if os.access(beside, os.X_OK) else shutil.which(command)


def run_help(commands: list[list[str]], cwd) -> list[subprocess.CompletedProcess]:
    """Runs every `command --help` at once (each imports JAX: seconds)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [*command, "--help"],
            cwd=cwd,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for command in commands
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    return results


def check_help(result: subprocess.CompletedProcess, command: str) -> None:
    assert result.returncode == 0, result.stderr[-2000:]
    module, names = COMMANDS[command]
    first_line = importlib.import_module(module).__doc__.splitlines()[0]
    assert result.stdout.startswith(first_line), result.stdout[:500]
    assert lists_flags(result.stdout, names), result.stdout


@pytest.mark.slow
def test_installed_console_scripts_answer_help_with_status_0(tmp_path):
    """From a directory outside the checkout, as a user runs them."""
    paths = {command: installed_script(command) for command in COMMANDS}
    if None in paths.values():
        pytest.skip("console scripts not installed (pip install -e .)")
    results = run_help([[paths[command]] for command in COMMANDS], cwd=tmp_path)
    for command, result in zip(COMMANDS, results, strict=True):
        check_help(result, command)


def runs_when_executed_as_main(module: str) -> bool:
    """Whether `module` ends with `if __name__ == "__main__": run()`: then `python -m
    module` runs the same `run()` as its console script, which the test above runs."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    last = tree.body[-1]
    return (
        isinstance(last, ast.If)
        and ast.unparse(last.test) == "__name__ == '__main__'"
        and [ast.unparse(statement) for statement in last.body] == ["run()"]
    )


@pytest.mark.parametrize("command", list(COMMANDS))
def test_python_m_runs_the_console_scripts_function(command):
    assert runs_when_executed_as_main(COMMANDS[command][0])
