"""mokd_jax: multi-objective knowledge distillation (MoKD) in JAX/Flax."""

from mokd_jax.xla_flags import apply_cpu_defaults

__version__ = "0.1.0"

apply_cpu_defaults()
