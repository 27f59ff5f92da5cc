"""Building blocks shared by the model families: torch's initialisers, torch-exact convs
and BatchNorm, the conv -> BN -> activation unit, and the computation dtype.

Every layer takes the computation `dtype`: activations and matmuls/convs run in it while
parameters stay float32 (Flax's default `param_dtype`) and BatchNorm keeps float32
statistics (Flax computes batch statistics in at least float32 and stores float32 running
averages whatever `dtype` is).
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from mokd_jax.errors import invalid
from mokd_jax.models import convolution

# torch's kaiming_normal_(mode='fan_out', nonlinearity='relu'): an untruncated normal of
# variance 2 / (k * k * out_channels), as torchvision's and RepDistiller's models draw.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default for nn.Linear and nn.Conv2d weights, kaiming_uniform_(a=sqrt(5)), is
# uniform(+-1/sqrt(fan_in)); Flax's fan-in of a grouped HWIO kernel, k * k * in / groups,
# is torch's.
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPES = tuple(_DTYPES)  # the compute dtypes a model accepts, by name


def computation_dtype(value: object) -> Dtype:
    """`value` (a jnp dtype, or 'float32' / 'bfloat16') as the jnp dtype models compute in."""
    try:
        name = jnp.dtype(value).name
    except (TypeError, ValueError):
        name = None
    if name not in _DTYPES:
        raise invalid("dtype", value, "one of " + ", ".join(map(repr, DTYPES)))
    return _DTYPES[name]


def uniform(bound: float) -> Initializer:
    """uniform(-bound, bound): torch's default Linear/Conv bias, whose bound needs the fan-in
    that a bias initialiser is never shown."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(features: int, fan_in: int, dtype: Dtype) -> nn.Dense:
    """A Dense layer initialised as torch's nn.Linear(fan_in, features) is by default."""
    return nn.Dense(
        features,
        kernel_init=torch_default_init,
        bias_init=uniform(fan_in**-0.5),
        dtype=dtype,
    )


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    groups: int = 1,
    use_bias: bool = False,
    kernel_init: Initializer = conv_init,
    bias_init: Initializer = nn.initializers.zeros,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A conv with torch's symmetric padding k//2 (never 'SAME', which pads stride-2
    convolutions only at the bottom/right), bias-free unless `use_bias` (then `bias_init`,
    zero by default), its backward pass reading a stored copy of its input on CPU
    (`convolution`)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        name=name,
        conv_general_dilated=convolution.conv_general_dilated,
    )


def batch_norm(
    dtype: Dtype = jnp.float32,
    scale_init: Initializer = nn.initializers.ones,
    name: str | None = None,
) -> nn.BatchNorm:
    """torch's BatchNorm2d defaults (torch momentum 0.1 is flax momentum 0.9), scale 1 and
    bias 0 unless `scale_init` says otherwise.

    One difference from torch is kept: the running variance averages the batch's biased
    variance, where torch averages the unbiased one (x n / (n - 1), n = batch x height x
    width); it changes only eval-mode statistics, by under 1e-3 relative for n > 1000."""
    return nn.BatchNorm(momentum=0.9, epsilon=1e-5, scale_init=scale_init, dtype=dtype, name=name)


class ConvBN(nn.Module):
    """conv -> BatchNorm -> `activation` (None: none), the unit that torchvision calls
    Conv2dNormActivation and timm ConvNormAct. Its children `conv` and `bn` are timm's
    `.conv` / `.bn` keys and torchvision's `.0` / `.1`."""

    features: int
    kernel: int
    stride: int = 1
    groups: int = 1
    activation: Callable[[jax.Array], jax.Array] | None = nn.relu
    use_bias: bool = False
    kernel_init: Initializer = conv_init
    bn_scale_init: Initializer = nn.initializers.ones
    dtype: Dtype = jnp.float32

    def setup(self):
        self.conv = conv(
            self.features,
            self.kernel,
            self.stride,
            groups=self.groups,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
        )
        self.bn = batch_norm(self.dtype, scale_init=self.bn_scale_init)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = self.bn(self.conv(x), use_running_average=not train)
        return x if self.activation is None else self.activation(x)
