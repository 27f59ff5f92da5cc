"""Helpers for the tests that launch one JAX job as two local processes (not a test file)."""

import os
import socket


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the coordinator's)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def xla_flags(*flags: str) -> str:
    """This process's XLA_FLAGS (the tests' compile settings, tests/conftest.py) with
    `flags` added, for a subprocess's environment."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def two_process_environment(index: int, port: int) -> dict[str, str]:
    """The environment of process `index` of a two-process job over localhost, each process
    with 2 CPU devices (what `jax.distributed.initialize` reads when launched by hand)."""
    return {
        **os.environ,
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(index),
    }
