import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mokd_jax.models.convolution import conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")

CASES = {
    "3x3 stride 1": dict(rhs=(3, 3, 4, 6), window_strides=(1, 1), padding=((1, 1), (1, 1))),
    "3x3 stride 2": dict(rhs=(3, 3, 4, 6), window_strides=(2, 2), padding=((1, 1), (1, 1))),
    "1x1 stride 2": dict(rhs=(1, 1, 4, 6), window_strides=(2, 2), padding=((0, 0), (0, 0))),
    "grouped": dict(rhs=(3, 3, 2, 6), window_strides=(1, 1), padding="SAME", feature_group_count=2),
    "dilated": dict(
        rhs=(3, 3, 4, 4), window_strides=(1, 1), padding=((2, 2), (2, 2)), rhs_dilation=(2, 2)
    ),
}


def arrays(case, seed=0):
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((2, 9, 9, 4)).astype(np.float32)
    rhs = rng.standard_normal(case["rhs"]).astype(np.float32)
    return jnp.asarray(lhs), jnp.asarray(rhs)


def options(case):
    return {key: value for key, value in case.items() if key != "rhs"} | {"dimension_numbers": NHWC}


def values_and_gradients(conv, lhs, rhs, case):
    """The convolution of relu(lhs) (an elementwise producer, as in a network) and the
    gradients of <conv, cotangent> for a fixed random cotangent, jitted."""

    def loss(lhs, rhs):
        out = conv(jax.nn.relu(lhs), rhs, **options(case))
        cotangent = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
    return out, grads


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_are_laxs(name):
    case = CASES[name]
    lhs, rhs = arrays(case)
    ours, our_grads = values_and_gradients(conv_general_dilated, lhs, rhs, case)
    theirs, their_grads = values_and_gradients(lax.conv_general_dilated, lhs, rhs, case)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    for our_grad, their_grad in zip(our_grads, their_grads, strict=True):
        np.testing.assert_allclose(our_grad, their_grad, rtol=1e-5, atol=1e-5)


def test_gradients_outside_jit_are_laxs():
    """Op by op (no `jit`), as in a notebook: the backward pass runs eagerly too."""
    case = CASES["3x3 stride 2"]
    lhs, rhs = arrays(case)

    def loss(conv, lhs, rhs):
        return jnp.sum(jnp.sin(conv(lhs, rhs, **options(case))))

    ours = jax.grad(lambda *a: loss(conv_general_dilated, *a), argnums=(0, 1))(lhs, rhs)
    theirs = jax.grad(lambda *a: loss(lax.conv_general_dilated, *a), argnums=(0, 1))(lhs, rhs)
    for our_grad, their_grad in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(our_grad, their_grad, rtol=1e-5, atol=1e-5)


def test_a_nan_input_still_flows_through_the_stored_copy():
    """The copy's predicate must hold for NaN too: with a NaN as the input's first entry
    (the entry the predicate looks at), the gradient is lax's, NaNs in the same places."""
    case = CASES["3x3 stride 1"]
    lhs, rhs = arrays(case)
    lhs = lhs.at[0, 0, 0, 0].set(jnp.nan)
    _, (_, our_kernel_grad) = values_and_gradients(conv_general_dilated, lhs, rhs, case)
    _, (_, their_kernel_grad) = values_and_gradients(lax.conv_general_dilated, lhs, rhs, case)
    assert np.isnan(their_kernel_grad).any() and not np.isnan(their_kernel_grad).all()
    np.testing.assert_allclose(our_kernel_grad, their_kernel_grad, rtol=1e-5, atol=1e-5)


def compiled_gradient_text(lhs, rhs):
    def loss(lhs, rhs):
        produced = jax.nn.relu(lhs * 1.5 + 0.25)
        return jnp.sum(conv_general_dilated(produced, rhs, (1, 1), "SAME", dimension_numbers=NHWC))

    return jax.jit(jax.grad(loss, argnums=1)).lower(lhs, rhs).compile().as_text()


def test_on_cpu_the_backward_pass_reads_one_stored_input():
    """The transposed copy the weight gradient reads has one operand, the stored input,
    instead of recomputing the input's elementwise producer from its operands."""
    lhs, rhs = arrays(CASES["3x3 stride 1"])
    entry = compiled_gradient_text(lhs, rhs).split("ENTRY")[1]
    assert "conditional(" in entry
    transposes = [line for line in entry.splitlines() if "transpose" in line and "fusion(" in line]
    assert transposes, entry
    for line in transposes:
        operands = line.split("fusion(", 1)[1].split(")", 1)[0]
        assert "," not in operands, line


def test_the_forward_pass_alone_and_other_platforms_have_no_conditional():
    lhs, rhs = arrays(CASES["3x3 stride 1"])
    forward = jax.jit(
        lambda lhs, rhs: conv_general_dilated(lhs, rhs, (1, 1), "SAME", dimension_numbers=NHWC)
    )
    assert "conditional(" not in forward.lower(lhs, rhs).compile().as_text()

    def loss(lhs, rhs):
        return jnp.sum(conv_general_dilated(lhs, rhs, (1, 1), "SAME", dimension_numbers=NHWC))

    def exported(platform):
        gradients = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return jax.export.export(gradients, platforms=[platform])(lhs, rhs).mlir_module()

    # The conditional's predicate (comparisons of the probed entry) is in the CPU program
    # only; for a GPU, `platform_dependent` leaves a selector with constant indices.
    assert "stablehlo.compare" in exported("cpu")
    assert "stablehlo.compare" not in exported("cuda")
