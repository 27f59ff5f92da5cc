"""Kept so that `python scripts/benchmark.py ...` keeps working: the same as `mokd-benchmark`
(`mokd_jax/benchmark.py`; needs the package installed, e.g. `pip install -e .`)."""

from mokd_jax.benchmark import run

if __name__ == "__main__":
    run()
