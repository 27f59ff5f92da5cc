"""mokd_jax: multi-objective knowledge distillation (MoKD) in JAX/Flax."""

__version__ = "0.1.0"
