"""Test setup: quiet TensorFlow, deterministic CPU, and shared small configs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402

from configs import default  # noqa: E402


@pytest.fixture
def smoke_config():
    """The default config's smoke variant: tiny step counts on the real digits data."""
    return default.get_config("smoke")
