"""Test setup: quiet TensorFlow, deterministic CPU, shared small configs, and the project's
pyproject.toml."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402

from configs import default  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself needs tomli before Python 3.11
    import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def smoke_config():
    """The default config's smoke variant: tiny step counts on the real digits data."""
    return default.get_config("smoke")


@pytest.fixture(scope="session")
def pyproject() -> dict:
    """The repository's pyproject.toml, parsed."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)
