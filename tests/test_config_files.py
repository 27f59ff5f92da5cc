"""mokd_jax.config_files (a --config value -> a config file, bundled configs by name) and
mokd_jax.config_helpers.with_overrides; the config files import only from the package, so
they load from any directory, and an installed package finds its bundled configs."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

from configs import cifar100, default, imagenet
from mokd_jax import config_files, config_helpers
from mokd_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def test_a_checkout_bundles_its_configs_directory():
    assert config_files.bundled_dir() == CONFIGS
    assert config_files.bundled_names() == ["cifar100", "coco", "default", "detection", "imagenet"]


def test_resolve_keeps_an_existing_path_and_its_arg(tmp_path, monkeypatch):
    (tmp_path / "default.py").write_text("def get_config(arg=None): return {}\n")
    monkeypatch.chdir(tmp_path)  # a local file wins over the bundled config of that name
    assert config_files.resolve("default.py:smoke") == "default.py:smoke"
    path = os.path.join(CONFIGS, "imagenet.py")
    assert config_files.resolve(f"{path}:smoke") == f"{path}:smoke"


@pytest.mark.parametrize("value", ["imagenet", "imagenet.py"])
@pytest.mark.parametrize("arg", ["", ":resnet50_mobilenet_v1,smoke"])
def test_resolve_finds_a_bundled_config_by_name(tmp_path, monkeypatch, value, arg):
    monkeypatch.chdir(tmp_path)
    assert config_files.resolve(value + arg) == os.path.join(CONFIGS, "imagenet.py") + arg


@pytest.mark.parametrize("value", ["nope", "configs/nope.py", "nope:smoke"])
def test_a_value_naming_no_config_lists_the_bundled_ones(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    bundled = "cifar100, coco, default, detection, imagenet"
    with pytest.raises(InputError, match=rf"^config=.* bundled config: {bundled}"):
        config_files.resolve(value)


def test_load_from_another_directory_equals_the_config_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_files.load("imagenet:smoke").to_dict() == imagenet.get_config("smoke").to_dict()
    by_path = config_files.load(os.path.join(CONFIGS, "cifar100.py") + ":vgg13_vgg8,dkd")
    assert by_path.to_dict() == cifar100.get_config("vgg13_vgg8,dkd").to_dict()
    assert by_path.distill.dkd_beta == 6.0
    assert config_files.load("default").is_locked  # as --config gives it


@pytest.mark.parametrize("name", config_files.bundled_names())
def test_config_files_import_only_the_package_and_libraries(name):
    """Not `configs` nor a relative import: a config file loads from any path."""
    with open(os.path.join(CONFIGS, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module.split(".")[0] in {"mokd_jax", "ml_collections"}
        elif isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
            assert roots <= {"mokd_jax", "ml_collections"} | sys.stdlib_module_names


def test_with_overrides_sets_dotted_fields_of_a_locked_copy():
    base = default.get_config()
    config = config_helpers.with_overrides(
        base, {"aggregator": "sum", "aggregation.sum.weights": (1.0, 0.0), "seed": 3}
    )
    assert config.aggregator == "sum" and tuple(config.aggregation.sum.weights) == (1.0, 0.0)
    assert config.seed == 3 and config.is_locked
    assert base.aggregator == "mokd" and base.seed == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill.not_yet": 1.0}, r"^distill.not_yet=1.0 is not allowed: the config has no"),
        ({"nothing.here": 1}, r"^nothing.here=1 is not allowed: the config has no such field"),
        ({"student.learning_rate": "fast"}, r"^student.learning_rate='fast' is not allowed: "),
    ],
)
def test_with_overrides_refuses_unknown_fields_and_other_types(overrides, message):
    with pytest.raises(InputError, match=message):
        config_helpers.with_overrides(default.get_config(), overrides)


@pytest.mark.slow
def test_an_installed_package_finds_its_bundled_configs_from_anywhere(tmp_path):
    """`pip install --target` of a copy of the sources (no build files in the checkout),
    then a process outside both that has only the installed package: no `configs` module,
    no checkout on its path."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend, not isolated
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(REPO, name), source / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(REPO, "mokd_jax"), source / "mokd_jax", ignore=ignore)
    shutil.copytree(CONFIGS, source / "configs", ignore=ignore)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--no-index", f"--target={site}", str(source),
        ],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import importlib.util, mokd_jax\n"
        "from mokd_jax import config_files\n"
        "assert importlib.util.find_spec('configs') is None\n"
        "config = config_files.load('imagenet:smoke')\n"
        "print(mokd_jax.__file__, config_files.bundled_dir(), config.dataset, sep='\\n')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    package, bundled, dataset = result.stdout.split()
    assert package == str(site / "mokd_jax" / "__init__.py")
    assert bundled == str(site / "mokd_jax" / "configs") and dataset == "imagenet2012"
