"""XLA:CPU settings the project applies to its own runs, added to `XLA_FLAGS` when the
package is imported (`mokd_jax/__init__.py`), before JAX creates its CPU backend.

`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: jaxlib 0.10 hands every
convolution to YNNPACK by default. On the 2-core AVX-512 machine the project is tested on,
XLA's Eigen convolutions were faster for the ResNet shapes we train: a 3x3, 64-channel
convolution on 16 56x56 maps took 44 ms forward and 114 ms forward and backward with
YNNPACK, 25 ms and 71 ms with Eigen; the whole ResNet-34 -> ResNet-18 distillation step
(112 px, batch 16, `mokd-benchmark --framework=both`) went from 0.71 s to 0.58 s, MoKD's from
0.97 s to 0.88 s (docs/benchmarks.md). YNNPACK keeps the fused graphs it also builds (the
flag removes only its single-convolution path).

`--xla_cpu_enable_fast_math=true`, with NaNs, infinities, divisions and math functions
still honoured (the four `--xla_cpu_fast_math_honor_*=true`, XLA's own defaults, named so
that a later default cannot loosen them): what is left of fast math is that LLVM may
reassociate floating-point additions and multiplications, contract them into fused
multiply-adds and ignore the sign of zero. Reassociation is what lets LLVM vectorise XLA's
reductions: without it a reduction accumulates serially in scalar code. The MoKD Gram
matrix (nine products per parameter for K = 2, `aggregation.gram`) is such a reduction; on
ResNet-18 gradients it took 15 ms without the flag and 5 ms with it, and the whole `mokd`
update 24 against 13 ms for K = 2, 53 against 17 ms for K = 3 (2 CPU cores,
docs/benchmarks.md); the distillation steps took as long as before. Sums come out in a
different order, so results differ from XLA's serial ones by float32 rounding, as they do
between XLA's CPU and GPU backends.

The flags only touch the CPU backend.

The user's settings win: a flag already named in `XLA_FLAGS` is left as it is, and
`MOKD_XLA_DEFAULTS=0` turns the defaults off. They are applied for the jaxlib releases they
were measured with (`MEASURED_JAXLIB`), since XLA refuses to start on a flag it does not
know and a later release may drop or change these experimental ones; re-run the benchmark
before widening the range. Once JAX's backends exist, `XLA_FLAGS` is no longer read, so a
process that ran JAX before importing `mokd_jax` keeps XLA's defaults.
"""

import os
from collections.abc import MutableMapping

CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_fast_math_honor_nans=true",
    "--xla_cpu_fast_math_honor_infs=true",
    "--xla_cpu_fast_math_honor_division=true",
    "--xla_cpu_fast_math_honor_functions=true",
)

MEASURED_JAXLIB = ((0, 10),)
"""(major, minor) of the jaxlib releases CPU_FLAGS were measured with."""


def flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def with_defaults(xla_flags: str, defaults: tuple[str, ...]) -> str:
    """`xla_flags` with each of `defaults` whose flag it does not name appended."""
    named = {flag_name(flag) for flag in xla_flags.split()}
    missing = [flag for flag in defaults if flag_name(flag) not in named]
    return " ".join([xla_flags, *missing]).strip()


def jaxlib_release() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, read without importing it, or None."""
    from importlib import metadata

    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds CPU_FLAGS to `environ['XLA_FLAGS']` (module docstring)."""
    if environ.get("MOKD_XLA_DEFAULTS", "1") == "0" or jaxlib_release() not in MEASURED_JAXLIB:
        return
    environ["XLA_FLAGS"] = with_defaults(environ.get("XLA_FLAGS", ""), CPU_FLAGS)
