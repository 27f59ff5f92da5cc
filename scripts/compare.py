"""Kept so that `python scripts/compare.py ...` keeps working: the same as `mokd-compare`
(`mokd_jax/compare.py`; needs the package installed, e.g. `pip install -e .`)."""

from mokd_jax.compare import run

if __name__ == "__main__":
    run()
