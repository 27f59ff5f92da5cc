"""The machine a benchmark ran on, for its JSON's `machine` section: shared by the step
benchmark (`mokd_jax.benchmark`) and the input pipeline benchmark
(`mokd_jax.pipeline_benchmark`), which imports no JAX or TensorFlow before it runs."""

import os
import platform
from typing import Any


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name as Linux reports it (e.g. 'AMD EPYC ...'), or None where there is
    no such file or line. `platform.processor()` gives only the architecture on Linux, and
    the same two-core CPU budget on different models gave different ratios against the
    peer, so the JSON records which one a run had."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return None


def machine_info(load_before: tuple[float, ...]) -> dict[str, Any]:
    """The host, its CPU and core count, and the load average before the run (as given)
    and now, as JSON lists."""
    return {
        "node": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
    }
