import os
import subprocess
import sys

import pytest

from mokd_jax import xla_flags


def test_defaults_are_appended_and_a_users_flag_wins():
    flag = xla_flags.CPU_FLAGS[0]
    assert xla_flags.with_defaults("", (flag,)) == flag
    assert xla_flags.with_defaults("--a=1", (flag,)) == f"--a=1 {flag}"
    users = f"{xla_flags.flag_name(flag)}=individual_dot"
    assert xla_flags.with_defaults(users, (flag,)) == users


def test_the_opt_out_and_an_unmeasured_jaxlib_leave_xla_flags_alone(monkeypatch):
    environ = {"XLA_FLAGS": "--a=1", "MOKD_XLA_DEFAULTS": "0"}
    xla_flags.apply_cpu_defaults(environ)
    assert environ["XLA_FLAGS"] == "--a=1"
    monkeypatch.setattr(xla_flags, "jaxlib_release", lambda: (99, 0))
    environ = {"XLA_FLAGS": "--a=1"}
    xla_flags.apply_cpu_defaults(environ)
    assert environ["XLA_FLAGS"] == "--a=1"


@pytest.mark.slow
def test_importing_the_package_sets_the_flags_before_the_backend_reads_them():
    """In a fresh interpreter: the flags are in the environment once mokd_jax is imported,
    and the CPU backend starts with them (XLA would abort on a flag it does not know)."""
    code = (
        "import os, mokd_jax, jax, jax.numpy as jnp;"
        "print(os.environ['XLA_FLAGS']);"
        "print(float(jnp.ones(3).sum()))"
    )
    environ = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True
    )
    flags_line, total = result.stdout.splitlines()[-2:]
    assert xla_flags.CPU_FLAGS[0] in flags_line.split() and total == "3.0"
