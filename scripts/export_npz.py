"""Kept so that `python scripts/export_npz.py ...` keeps working: the same as
`mokd-export-npz` (`mokd_jax/data/export_npz.py`; needs the package installed, e.g.
`pip install -e .`)."""

from mokd_jax.data.export_npz import run

if __name__ == "__main__":
    run()
