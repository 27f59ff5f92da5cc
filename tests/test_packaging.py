"""pyproject.toml against the files it must agree with: requirements.txt (the runtime
dependencies), requirements-test.txt (the `test` extra), the package directories, and the
README's test command against the one CI runs."""

import os

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec(requirement: str) -> tuple:
    """A requirement as comparable parts: name, extras, version specifier, marker."""
    parsed = Requirement(requirement)
    return (
        canonicalize_name(parsed.name),
        tuple(sorted(parsed.extras)),
        str(parsed.specifier),
        str(parsed.marker or ""),
    )


def requirements_file(name: str) -> list[str]:
    """The requirements of a requirements file: no comments, blanks or `-r` includes."""
    with open(os.path.join(REPO, name)) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("-")]


def test_dependencies_are_requirements_txt_with_the_same_bounds(pyproject):
    declared = sorted(map(spec, pyproject["project"]["dependencies"]))
    assert declared == sorted(map(spec, requirements_file("requirements.txt")))


def test_test_extra_is_requirements_test_txt(pyproject):
    with open(os.path.join(REPO, "requirements-test.txt")) as f:
        assert "-r requirements.txt" in f.read().splitlines()
    extras = pyproject["project"]["optional-dependencies"]
    assert sorted(map(spec, extras["test"])) == sorted(
        map(spec, requirements_file("requirements-test.txt"))
    )
    assert [spec(r)[0] for r in extras["torch"]] == ["torch"]


def test_metadata_files_exist(pyproject):
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"
    with open(os.path.join(REPO, project["license-files"][0])) as f:
        assert "Apache License" in f.read()
    assert os.path.isfile(os.path.join(REPO, project["readme"]))


def test_every_package_directory_is_listed_and_configs_is_bundled(pyproject):
    setuptools = pyproject["tool"]["setuptools"]
    found = [
        os.path.relpath(directory, REPO).replace(os.sep, ".")
        for directory, _, files in os.walk(os.path.join(REPO, "mokd_jax"))
        if "__init__.py" in files
    ]
    assert sorted(setuptools["packages"]) == sorted([*found, "mokd_jax.configs"])
    assert setuptools["package-dir"] == {"mokd_jax.configs": "configs"}


def test_ci_runs_exactly_the_readme_test_command():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read().splitlines()
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci_command = f.read().strip().splitlines()[-1]
    test_comment = next(i for i, line in enumerate(readme) if line.startswith("# 2. install"))
    assert readme[test_comment + 1] == ci_command
    assert ci_command.endswith("python -m pytest -q -n 2 --dist worksteal")
