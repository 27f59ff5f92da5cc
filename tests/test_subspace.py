"""mokd_jax.subspace: what its docstring promises.

Shapes and per-sample standardisation of both outputs, the teacher lift (a fixed matrix
with orthonormal rows in the `constants` collection, drawn from `seed` and the tap, an
isometry), the student lift kept orthogonal through training (`orthogonal=True`),
determinism, scale invariance, an exact match giving a zero feature loss, where the
gradient goes, and one projector per tap (`TapProjectors`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mokd_jax import objectives
from mokd_jax.errors import InputError
from mokd_jax.subspace import (
    OrthogonalDense,
    SubspaceProjector,
    TapProjectors,
    semi_orthogonal,
    standardize,
)

BATCH, STUDENT_WIDTH, TEACHER_WIDTH, WIDTH = 5, 6, 4, 8


def features(seed: int = 0, batch: int = BATCH):
    student_key, teacher_key = jax.random.split(jax.random.key(seed))
    return (
        jax.random.normal(student_key, (batch, STUDENT_WIDTH)) * 3.0 + 1.0,
        jax.random.normal(teacher_key, (batch, TEACHER_WIDTH)) * 2.0 - 0.5,
    )


def init(projector, key: int = 0):
    return projector.init(jax.random.key(key), *features())


def lift_of(variables) -> np.ndarray:
    return np.asarray(variables["constants"]["teacher_lift"])


def test_outputs_are_batch_by_width_and_standardised_per_sample():
    projector = SubspaceProjector(width=WIDTH)
    projected, target = projector.apply(init(projector), *features())
    for output in (projected, target):
        assert output.shape == (BATCH, WIDTH)
        np.testing.assert_allclose(output.mean(-1), 0.0, atol=1e-5)
        np.testing.assert_allclose(output.var(-1), 1.0, rtol=1e-3)


def test_variables_are_the_student_lift_and_the_teacher_constant():
    variables = init(SubspaceProjector(width=WIDTH))
    assert set(variables) == {"params", "constants"}
    kernel = variables["params"]["lift_student"]["kernel"]
    assert kernel.shape == (STUDENT_WIDTH, WIDTH)
    assert variables["params"]["lift_student"]["bias"].shape == (WIDTH,)
    assert list(variables["constants"]) == ["teacher_lift"]
    assert lift_of(variables).shape == (TEACHER_WIDTH, WIDTH)


def test_width_below_the_teachers_is_refused():
    projector = SubspaceProjector(width=TEACHER_WIDTH - 1)
    with pytest.raises(InputError, match=r"projector\.width=3 is not allowed: >= the teacher's"):
        init(projector)


def test_a_width_equal_to_the_teachers_is_allowed():
    projector = SubspaceProjector(width=TEACHER_WIDTH)
    lift = lift_of(init(projector))
    np.testing.assert_allclose(lift @ lift.T, np.eye(TEACHER_WIDTH), atol=1e-5)


def test_teacher_lift_has_orthonormal_rows_and_keeps_distances():
    lift = lift_of(init(SubspaceProjector(width=WIDTH)))
    np.testing.assert_allclose(lift @ lift.T, np.eye(TEACHER_WIDTH), atol=1e-5)
    _, teacher = features(seed=3)
    differences = np.asarray(teacher[:, None] - teacher[None])  # every pair
    np.testing.assert_allclose(
        np.linalg.norm(differences @ lift, axis=-1),
        np.linalg.norm(differences, axis=-1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_teacher_lift_depends_on_the_seed_only():
    """Drawn from `seed`, not from the init key: every run with the seed gets the same one."""
    same = [lift_of(init(SubspaceProjector(width=WIDTH, seed=7), key)) for key in (0, 1)]
    np.testing.assert_array_equal(*same)
    other = lift_of(init(SubspaceProjector(width=WIDTH, seed=8)))
    assert not np.allclose(same[0], other)


def test_init_is_deterministic_per_key():
    projector = SubspaceProjector(width=WIDTH, orthogonal=True)
    jax.tree.map(np.testing.assert_array_equal, init(projector, 3), init(projector, 3))
    other = init(projector, 4)["params"]["lift_student"]["kernel"]
    assert not np.allclose(init(projector, 3)["params"]["lift_student"]["kernel"], other)
    variables = init(projector, 3)
    first = projector.apply(variables, *features(1))
    jax.tree.map(np.testing.assert_array_equal, first, projector.apply(variables, *features(1)))


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (4, 4)])
def test_semi_orthogonal_gives_orthonormal_rows_or_columns(shape):
    """Rows when the matrix is wide (the student narrower than the subspace), columns when
    it is tall; an orthogonal matrix is its own orthonormal factor."""
    matrix = jax.random.normal(jax.random.key(0), shape)
    factor = np.asarray(semi_orthogonal(matrix), np.float64)
    assert factor.shape == shape
    small = min(shape)
    gram = factor @ factor.T if shape[0] <= shape[1] else factor.T @ factor
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-6)
    np.testing.assert_allclose(semi_orthogonal(jnp.asarray(factor, jnp.float32)), factor, atol=1e-6)


def effective_lift(lift_params) -> np.ndarray:
    """The map an `OrthogonalDense` applies, read off its outputs: the images of the unit
    vectors minus the bias, [d_s, D]."""
    kernel = lift_params["kernel"]
    rows = OrthogonalDense(kernel.shape[1]).apply({"params": lift_params}, jnp.eye(kernel.shape[0]))
    return np.asarray(rows - lift_params["bias"], np.float64)


def trained(projector, steps: int = 20):
    """The projector's variables after `steps` Adam steps on the feature loss of one
    batch, and the losses before and after."""
    variables = init(projector)
    student, teacher = features(6, batch=16)
    tx = optax.adam(0.05)

    def loss(params):
        outputs = projector.apply({**variables, "params": params}, student, teacher)
        return objectives.feature_distance(*outputs)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = variables["params"], tx.init(variables["params"])
    first = float(loss(params))
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return {**variables, "params": params}, first, float(loss(params))


def test_an_orthogonal_student_lift_stays_orthogonal_through_training():
    """The lift is a parameterisation, not an init: after 20 Adam steps it has moved, the
    loss has dropped, and the map applied still has orthonormal rows (W W^T = I)."""
    projector = SubspaceProjector(width=WIDTH, orthogonal=True)
    start = effective_lift(init(projector)["params"]["lift_student"])
    variables, first, last = trained(projector)
    lift = effective_lift(variables["params"]["lift_student"])
    np.testing.assert_allclose(start @ start.T, np.eye(STUDENT_WIDTH), atol=1e-5)
    np.testing.assert_allclose(lift @ lift.T, np.eye(STUDENT_WIDTH), atol=1e-5)
    assert np.abs(lift - start).max() > 0.1
    assert last < first


def test_a_plain_student_lift_does_not_stay_orthogonal():
    """Without the parameterisation the trained lift leaves the orthogonal matrices: the
    Gram check above can fail."""
    variables, _, _ = trained(SubspaceProjector(width=WIDTH))
    kernel = np.asarray(variables["params"]["lift_student"]["kernel"])
    assert not np.allclose(kernel @ kernel.T, np.eye(STUDENT_WIDTH), atol=1e-2)


def test_shrinking_the_student_lift_or_the_teacher_features_changes_nothing():
    """The standardisation removes the scale of both sides: the loss cannot be lowered by
    shrinking activations."""
    projector = SubspaceProjector(width=WIDTH)
    variables = init(projector)
    student, teacher = features(2)
    projected, target = projector.apply(variables, student, teacher)
    shrunk = {**variables, "params": jax.tree.map(lambda p: 0.1 * p, variables["params"])}
    shrunk_projected, shrunk_target = projector.apply(shrunk, student, 0.1 * teacher)
    np.testing.assert_allclose(shrunk_projected, projected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(shrunk_target, target, rtol=1e-3, atol=1e-3)
    assert float(objectives.feature_distance(projected, target)) > 0.1  # not trivially equal


def test_a_student_that_maps_onto_the_teachers_lift_has_zero_feature_loss():
    """Student lift = the teacher lift (no bias), student features = the standardised
    teacher features: both sides are the same vector, so the feature loss is zero."""
    projector = SubspaceProjector(width=WIDTH)
    _, teacher = features(4)
    variables = projector.init(jax.random.key(0), jnp.zeros((1, TEACHER_WIDTH)), teacher)
    lift = variables["constants"]["teacher_lift"]
    matched = {
        **variables,
        "params": {"lift_student": {"kernel": lift, "bias": jnp.zeros(WIDTH)}},
    }
    projected, target = projector.apply(matched, standardize(teacher), teacher)
    np.testing.assert_allclose(projected, target, atol=1e-5)
    assert float(objectives.feature_distance(projected, target)) == pytest.approx(0.0, abs=1e-9)
    # ... and a student lift away from it does not (a random step: a constant one would be
    # absorbed by the standardisation).
    step = 0.3 * jax.random.normal(jax.random.key(9), lift.shape)
    off = {"lift_student": {"kernel": lift + step, "bias": jnp.zeros(WIDTH)}}
    moved, _ = projector.apply({**matched, "params": off}, standardize(teacher), teacher)
    assert float(objectives.feature_distance(moved, target)) > 1e-3


def test_gradient_reaches_the_student_lift_but_not_the_teacher_lift():
    projector = SubspaceProjector(width=WIDTH)
    variables = init(projector)
    student, teacher = features(5)

    def loss(variables):
        return objectives.feature_distance(*projector.apply(variables, student, teacher))

    gradients = jax.grad(loss)(variables)
    for leaf in jax.tree.leaves(gradients["params"]):
        assert float(jnp.abs(leaf).max()) > 1e-6
    np.testing.assert_array_equal(gradients["constants"]["teacher_lift"], 0.0)


def test_tap_projectors_hold_one_projector_per_tap_at_its_teachers_width():
    """Each tap gets its own student lift (from its student width) and fixed teacher lift,
    `width_multiplier` x its teacher tap's width; different taps, different lifts."""
    student_taps = (jnp.ones((BATCH, 6)), jnp.ones((BATCH, 3)))
    teacher_taps = (jnp.ones((BATCH, 4)), jnp.ones((BATCH, 4)))
    projector = TapProjectors(width_multiplier=3, seed=1)
    variables = projector.init(jax.random.key(0), student_taps, teacher_taps)
    assert set(variables["params"]) == set(variables["constants"]) == {"tap0", "tap1"}
    for name, student_width in (("tap0", 6), ("tap1", 3)):
        assert variables["params"][name]["lift_student"]["kernel"].shape == (student_width, 12)
        assert variables["constants"][name]["teacher_lift"].shape == (4, 12)
    lifts = [np.asarray(variables["constants"][name]["teacher_lift"]) for name in ("tap0", "tap1")]
    assert not np.allclose(*lifts)
    pairs = projector.apply(variables, student_taps, teacher_taps)
    assert [tuple(output.shape for output in pair) for pair in pairs] == [((BATCH, 12),) * 2] * 2


def test_the_first_tap_is_the_single_projector():
    """`tap0` of `TapProjectors` is the `SubspaceProjector` of the same seed: the single
    pooled projector is the one-tap case."""
    student, teacher = features(7)
    single = SubspaceProjector(width=2 * TEACHER_WIDTH, seed=3)
    taps = TapProjectors(width_multiplier=2, seed=3)
    variables = taps.init(jax.random.key(0), (student,), (teacher,))
    single_variables = {collection: tree["tap0"] for collection, tree in variables.items()}
    jax.tree.map(
        np.testing.assert_array_equal,
        single.apply(single_variables, student, teacher),
        taps.apply(variables, (student,), (teacher,))[0],
    )
