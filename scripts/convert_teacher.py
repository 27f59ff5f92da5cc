"""Kept so that `python scripts/convert_teacher.py ...` keeps working: the same as
`mokd-convert` (`mokd_jax/convert_teacher.py`; needs the package installed, e.g.
`pip install -e .`)."""

from mokd_jax.convert_teacher import run

if __name__ == "__main__":
    run()
