"""Finds and loads config files: a `--config` value names a file by its path or, when no
file has that path, a config bundled with the package by its name (`imagenet`,
`default.py:smoke`); `define_config_flag` defines the `--config` flag that reads it so,
with ml_collections' `--config.field=value` overrides.

The bundled configs are the repository's configs/ directory. An installed package holds it
as mokd_jax/configs/ (pyproject.toml maps it there); a package imported from a checkout
(an editable install, or the repository root on sys.path) finds it beside mokd_jax/.
"""

import os

import ml_collections
from absl import flags
from ml_collections import config_flags

import mokd_jax
from mokd_jax.errors import invalid

# The flags defined here belong to the module that calls define_config_flag: its --help
# lists them.
flags.disclaim_key_flags()


def bundled_dir() -> str:
    """The directory of the bundled configs: mokd_jax/configs/ when installed, else the
    checkout's configs/ beside mokd_jax/."""
    package = os.path.dirname(os.path.abspath(mokd_jax.__file__))
    candidates = (os.path.join(package, "configs"), os.path.join(package, os.pardir, "configs"))
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "default.py")):
            return os.path.normpath(directory)
    raise FileNotFoundError(f"no bundled configs: none of {', '.join(candidates)} exists")


def bundled_names() -> list[str]:
    """The names of the bundled configs (file names without .py), sorted."""
    return sorted(
        name[: -len(".py")]
        for name in os.listdir(bundled_dir())
        if name.endswith(".py") and not name.startswith("_")
    )


def resolve(value: str) -> str:
    """A --config value 'FILE[:ARG]' with FILE made a path that exists: FILE itself if it
    is a file, else the bundled config of that name (with or without .py). Anything else
    raises the InputError that lists the bundled names."""
    path, colon, arg = value.partition(":")
    if os.path.isfile(path):
        return value
    name, names = path.removesuffix(".py"), bundled_names()
    if name in names:
        return os.path.join(bundled_dir(), f"{name}.py") + colon + arg
    allowed = f"an existing file, or a bundled config: {', '.join(names)} (with :ARG)"
    raise invalid("config", value, allowed)


class _ResolvingParser(flags.ArgumentParser):
    """ml_collections' parser of a config file's path, given the path `resolve` finds."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument: str):
        return self._parser.parse(resolve(argument))

    def flag_type(self) -> str:
        return self._parser.flag_type()


def define_config_flag(
    name: str, help_string: str, flag_values: flags.FlagValues = flags.FLAGS, **kwargs
) -> flags.FlagHolder:
    """A required ml_collections config-file flag (`--NAME=FILE[:ARG]`, overrides
    `--NAME.field=value`) whose FILE may also be the name of a bundled config; `kwargs` go
    to `config_flags.DEFINE_config_file`."""
    holder = config_flags.DEFINE_config_file(
        name, None, help_string, flag_values=flag_values, **kwargs
    )
    flag_values[name].parser = _ResolvingParser(flag_values[name].parser)
    flags.mark_flag_as_required(name, flag_values)
    return holder


def load(value: str) -> ml_collections.ConfigDict:
    """The config that `--config=VALUE` gives, with no override (for notebooks and tests);
    a VALUE naming no config raises the InputError of `resolve`."""
    resolve(value)
    flag_values = flags.FlagValues()
    argv = ["load", f"--config={value}"]
    holder = define_config_flag("config", "", flag_values, sys_argv=argv)
    flag_values(argv)
    return holder.value
