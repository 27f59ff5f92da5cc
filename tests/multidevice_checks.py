"""Checks that need 8 devices; tests/test_parallel.py runs this file in a pytest subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before JAX
starts, so it cannot run inside the main test process). Not collected on its own (the name
does not start with test_)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import default
from mokd_jax import data, networks, optimizers, parallel, steps, train
from mokd_jax import state as state_lib
from mokd_jax.aggregation.gram import gram_matrix
from mokd_jax.errors import InputError
from mokd_jax.normalization import UNIT

STEPS = 3
# Float32 sums over the batch and over devices are added in another order on 8 devices
# than on one; after 3 AdamW steps that rounding reaches ~1e-6 of the parameters' scale.
# A missing all-reduce (per-device instead of global gradients or BatchNorm statistics)
# would differ by orders of magnitude more.
RTOL, ATOL = 1e-4, 1e-5


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


def run_distillation(mesh, aggregator="mokd", fsdp_min_size=2**18, guard=False):
    """STEPS distillation steps of the smoke config on `mesh`; returns (state, metrics)."""
    config = default.get_config("smoke")
    config.aggregator = aggregator
    config.mesh.fsdp_min_size = fsdp_min_size
    dataset = data.load("digits")
    nets = networks.build_networks(
        config, dataset.num_classes, dataset.image_shape[0], teacher_input=UNIT, student_input=UNIT
    )
    tx = optimizers.student_optimizer(config)
    teacher_variables = parallel.place_variables(
        state_lib.init_model(nets.teacher, dataset.image_shape, jax.random.key(0)),
        mesh,
        fsdp_min_size,
    )
    create = functools.partial(state_lib.create_student_state, nets, dataset.image_shape, tx)
    abstract = jax.eval_shape(create, jax.random.key(0))
    shardings = parallel.tree_shardings(mesh, abstract, fsdp_min_size)
    state = jax.jit(create, out_shardings=shardings)(jax.random.key(1))
    step = parallel.compiled_step(
        steps.make_distill_step(config, nets, tx),
        shardings,
        mesh,
        extra_shardings=(parallel.variables_sharding(teacher_variables),),
    )
    batches = parallel.device_batches(dataset, 64, 0, 0, mesh)
    placed = [next(batches) for _ in range(STEPS)]
    with jax.transfer_guard("disallow" if guard else "allow"):
        for images, labels in placed:
            state, metrics = step(state, teacher_variables, images, labels)
    return jax.device_get(state), jax.device_get(metrics), state


def one_device_mesh():
    return parallel.make_mesh(1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def single_device_run():
    return run_distillation(one_device_mesh())


def assert_close(tree, reference):
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL),
        tree, reference,
    )  # fmt: skip


def test_data_parallel_steps_equal_one_device_without_implicit_transfers(single_device_run):
    """Under a transfer guard that raises on any implicit host-device transfer."""
    state, metrics, placed = run_distillation(parallel.make_mesh(1), guard=True)
    reference_state, reference_metrics, _ = single_device_run
    assert_close(state.params, reference_state.params)
    assert_close(state.batch_stats, reference_state.batch_stats)  # global-batch statistics
    assert_close(metrics, reference_metrics)
    kernel = jax.tree.leaves(placed.params["student"])[0]
    assert kernel.sharding.spec == PartitionSpec()  # replicated under pure data parallelism


def test_fsdp_steps_equal_one_device_and_shard_parameters(single_device_run):
    mesh = parallel.make_mesh(2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    state, metrics, placed = run_distillation(mesh, fsdp_min_size=1000)
    reference_state, reference_metrics, _ = single_device_run
    assert_close(state.params, reference_state.params)
    assert_close(metrics, reference_metrics)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(placed.params["student"])]
    assert any("fsdp" in spec for spec in specs)  # the large kernels are split
    assert any(spec == PartitionSpec() for spec in specs)  # biases (< 1000) are not


def test_gram_of_sharded_gradients_equals_unsharded():
    key = jax.random.key(0)
    shapes = {"conv": (3, 3, 16, 32), "dense": (32, 10), "bias": (10,)}
    gradients = {
        name: jax.random.normal(jax.random.fold_in(key, i), (2, *shape))
        for i, (name, shape) in enumerate(shapes.items())
    }
    mesh = parallel.make_mesh(2)
    sharded = jax.device_put(
        gradients,
        {
            "conv": NamedSharding(mesh, PartitionSpec(None, None, None, None, ("data", "fsdp"))),
            "dense": NamedSharding(mesh, PartitionSpec(None, "data", "fsdp")),
            "bias": NamedSharding(mesh, PartitionSpec()),
        },
    )
    want = jax.jit(gram_matrix)(jax.device_put(gradients, jax.devices()[0]))
    got = jax.jit(gram_matrix)(sharded)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def test_mesh_rejects_fsdp_that_does_not_divide_the_devices():
    with pytest.raises(InputError, match="mesh.fsdp=3.*divisor of the device count 8"):
        parallel.make_mesh(3)


def test_batch_size_must_split_over_the_devices(tmp_path):
    config = default.get_config("smoke")
    config.batch_size = 12
    with pytest.raises(InputError, match="batch_size=12.*multiple of the device count 8"):
        train.train_and_evaluate(config, str(tmp_path))


def test_smoke_run_on_eight_devices_matches_one_device_accuracy_scale(tmp_path):
    """The whole trainer (teacher, student, evaluation, checkpoints) on 8 devices."""
    config = default.get_config("smoke")
    config.teacher.num_train_steps = config.student.num_train_steps = 4
    config.log_every_steps = config.checkpoint_every_steps = 2
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["devices"] == 8
    assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
    assert jnp.isfinite(summary["training_diagnostics"]["loss_task"])
