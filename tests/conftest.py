"""Test setup: quiet TensorFlow, a compilation cache shared by the whole session, and the
project's pyproject.toml.

Most of the suite's time is XLA compiling the same few programs again (the smoke config's
steps, in-process and in the CLI, resume, preemption, notebook and comparison runs, each of
which builds fresh step functions): a persistent compilation cache, fresh for each session
and inherited by the subprocesses (and pytest-xdist's workers) through the environment,
turns every repeat into a
lookup (a smoke run: 22 s cold, 5 s warm, on 2 cores). `MOKD_TEST_XLA_CACHE=DIR` keeps the
cache in DIR across sessions instead, for a faster inner loop.
"""

import gc
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_disable_hlo_passes=hlo-verifier",
    "--xla_cpu_parallel_codegen_split_count=1",
)
"""The tests' programs are compiled for compile speed, not run speed. They run a few steps on
tiny shapes, so compiling is most of their time:
- `--xla_backend_optimization_level=0`: no LLVM optimisations; unoptimised machine code
  compiles 2 to 10 times faster (a smoke run's state creation: 11 s to 0.7 s);
- `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's older elemental emitters for fused
  loops instead of its MLIR fusion emitters, which take longer to compile. With both, a
  ResNet-18 training gradient compiles in 1.1-1.4 s against 2.2-3.0 s with the first
  alone, and runs as fast (2 cores; `jit(...).lower(...).compile()` timed in one process
  per setting);
- `--xla_disable_hlo_passes=hlo-verifier`: XLA checks its own HLO after its passes (an
  invariant check of the compiler, not of the program); without it a RetinaNet's K = 3
  distillation step compiled in 4.3-4.4 s instead of 4.9-5.2 s (two runs each);
- `--xla_cpu_parallel_codegen_split_count=1`: the machine code of a program in one piece
  instead of 32 compiled on parallel threads. The suite keeps every core busy with its
  own processes, so the split only adds work: tests/test_train.py with tests/test_steps.py
  took 66.6-68.8 s of CPU instead of 70.9-71.6 s, in the same wall time.
What a program computes depends on none of them; users' runs keep XLA's defaults. Set
here, before any JAX backend exists, and inherited by every subprocess through the
environment (`tests/processes.xla_flags`)."""
_missing = [flag for flag in FAST_COMPILE_FLAGS if flag not in os.environ.get("XLA_FLAGS", "")]
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_missing]).strip()

# Python's collector as the commands set it (`mokd_jax.cli.GC_THRESHOLDS`), before the
# collection and in every pytest process (pytest-xdist's workers and the subprocesses that
# run pytest import this file too): tracing and lowering JAX programs, and the collection's
# imports, allocate millions of objects that mostly live on, which the default thresholds
# re-walk. On 2 cores the collection (`pytest --collect-only`) took 8.1 s instead of 11.3 s,
# and tests/test_steps.py with tests/test_detection_steps.py spent 2.8 s in the collector
# instead of 6.9 s (timed with `gc.callbacks`).
from mokd_jax.cli import GC_THRESHOLDS  # noqa: E402

gc.set_threshold(*GC_THRESHOLDS)

import pytest  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself needs tomli before Python 3.11
    import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SESSION_CACHE: list[str] = []


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its controller's cache
        directory = os.environ["JAX_COMPILATION_CACHE_DIR"]
    else:
        directory = os.environ.get("MOKD_TEST_XLA_CACHE")
    if not directory:
        directory = tempfile.mkdtemp(prefix="mokd_jax_xla_cache_")
        _SESSION_CACHE.append(directory)
    # Environment first (subprocesses read it), then this process's jax config, which was
    # read at import and may be imported already.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_collection_finish(session):
    """Moves everything the imports and the collection created out of the garbage
    collector's sight (`gc.freeze`): those objects live for the whole session, and each of
    Python's full collections (automatic ones during the tests, and pytest's five at the
    end of a session) would otherwise walk all of them, JAX's, TensorFlow's and torch's
    modules included."""
    gc.freeze()


def pytest_unconfigure(config):
    for directory in _SESSION_CACHE:
        shutil.rmtree(directory, ignore_errors=True)


INNER_LOOP_METHODS = ("mokd", "pcgrad", "famo", "dot", "graddrop")
"""The aggregators that a sweep over (nearly) every method runs in the fast tier: one per
way of being driven (per-objective rows: the min-norm mokd and the projecting pcgrad; one
weighted row: famo; own momenta: dot; at the representation: graddrop). The full suite
runs every method."""

INNER_LOOP_MODELS = ("cnn_small", "resnet18", "resnet50", "resnet8x4", "mobilenet_v2", "vit_tiny")
"""The models that a sweep over the model zoo runs in the fast tier: one of each kind of
block the zoo converts and computes (plain convolutions; ResNet basic and bottleneck
blocks, ImageNet and CIFAR stems; depthwise-separable inverted residuals; attention). The
full suite runs every model."""

SWEEP_SIZE = 7
"""A test parametrized over at least this many aggregators (its `name`), or this many
models (its `name` or `arch`), is a sweep."""


def pytest_collection_modifyitems(config, items):
    """Marks `slow` the members of every sweep beyond the inner loop's (INNER_LOOP_METHODS,
    INNER_LOOP_MODELS; a sweep with none of them keeps its first member)."""
    from mokd_jax import aggregation, models

    def swept_value(item, keys, names):
        params = getattr(item, "callspec", None) and item.callspec.params or {}
        values = [params.get(key) for key in keys]
        return next((value for value in values if isinstance(value, str) and value in names), None)

    def sweep_of(item):
        return item.nodeid.split("::")[0], item.originalname

    for keys, names, inner_loop in (
        (("name",), aggregation.NAMES, INNER_LOOP_METHODS),
        (("name", "arch"), models.NAMES, INNER_LOOP_MODELS),
    ):
        members = [(item, value) for item in items if (value := swept_value(item, keys, names))]
        sweeps: dict[tuple[str, str], list[str]] = {}
        for item, value in members:
            sweeps.setdefault(sweep_of(item), []).append(value)
        for item, value in members:
            sweep = sweeps[sweep_of(item)]
            kept = set(sweep) & set(inner_loop) or {sweep[0]}
            if len(set(sweep)) >= SWEEP_SIZE and value not in kept:
                item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pyproject() -> dict:
    """The repository's pyproject.toml, parsed."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)
