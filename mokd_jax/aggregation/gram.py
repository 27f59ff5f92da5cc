"""Gram-space helpers shared by every aggregator.

Every aggregator here is a weighting: it turns the K x K Gram matrix G = J J^T of the
per-objective gradients J (K rows over the shared parameters) into K coefficients w and
returns d = J^T w. Only the K^2 dot products touch the parameters (and G is a plain sum over
parameter leaves or shards); everything after that is K x K arithmetic, which is why all the
helpers below take a Gram matrix and never a P-sized object.

The Gram matrix is kept *normalised* (largest diagonal entry 1) next to a separate scale, so
that float32 gradients anywhere between 1e-20 and 1e20 neither overflow nor underflow when
squared, and so that one absolute epsilon means the same thing at every gradient magnitude:
"negligible next to the largest gradient".
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mokd_jax.errors import invalid

EPS = 1e-8
"""Guard for denominators, relative to the largest gradient (normalised Gram units)."""

Mask = Any
"""A pytree of Python bools (True: aggregated, False: summed over objectives), or a prefix of
the gradient tree's structure (one bool covering a whole subtree)."""


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Matrix product in full float32 (GPUs would otherwise use TF32 for K x K algebra)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def safe_divide(
    numerator: jax.Array, denominator: jax.Array, fallback: float, floor: float = EPS
) -> jax.Array:
    """numerator / denominator where denominator > floor, else `fallback`; never NaN.

    The inner `where` keeps the untaken branch finite as well, so gradients through it stay
    finite too.
    """
    usable = denominator > floor
    return jnp.where(usable, numerator / jnp.where(usable, denominator, 1.0), fallback)


def nonzero(divisor: jax.Array) -> jax.Array:
    """`divisor`, with zeros replaced by 1: for normalising by a max that may be 0, where
    the numerators are then 0 as well and stay 0."""
    return jnp.where(divisor > 0, divisor, 1.0)


def inverse_losses(losses: jax.Array) -> jax.Array:
    """1 / (L_k + eps): grad log(L_k + eps) = g_k / (L_k + eps), the loss-scale-free gradient.
    Losses are clamped at 0 (a loss is assumed non-negative)."""
    return 1.0 / (jnp.maximum(losses, 0.0) + EPS)


def expand_mask(mask: Mask | None, tree: Any) -> Any:
    """Broadcasts a (prefix) mask of Python bools to one bool per leaf of `tree`.

    The flags must be static Python values: they decide, at trace time, which leaves enter
    the Gram matrix.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, tree)

    def broadcast(flag: Any, subtree: Any) -> Any:
        if not isinstance(flag, (bool, np.bool_)):
            raise invalid("aggregator.shared", flag, "Python bools (True: shared, False: not)")
        return jax.tree.map(lambda _: bool(flag), subtree)

    try:
        return jax.tree.map(broadcast, mask, tree)
    except ValueError as error:
        raise invalid(
            "aggregator.shared",
            jax.tree.structure(mask),
            f"a prefix of the gradient tree's structure {jax.tree.structure(tree)}",
        ) from error


RESCALINGS = (1.0, 2.0**-80, 2.0**80)
"""Factors J is multiplied by before the products, all in the same pass: J as it is, then
for gradients too large to square in float32 (entries up to float32's largest), then for
ones too small (down to its subnormals). Powers of two, so scaling is exact. For rows of up
to ~1e9 entries every float32 J has at least one candidate that `_is_exact_enough`."""


def gram_matrix(stacked_tree: Any, shared_mask: Mask | None = None) -> tuple[jax.Array, jax.Array]:
    """Gram matrix of the per-objective gradients over the shared leaves, overflow-safe.

    Args:
      stacked_tree: pytree whose leaves have a leading objective axis K (any float dtypes;
        the products are taken in float32).
      shared_mask: pytree (or prefix) of Python bools selecting the shared leaves; None: all.

    Returns:
      (gram, scale): float32 [K, K] with largest diagonal entry 1 (all zeros when every
      gradient is zero) and float32 scale, the largest per-objective gradient norm, such that
      the true Gram matrix is scale**2 * gram. The shared leaves count as ONE vector per
      objective.

    One pass over the gradients (`_raw_grams`) gives J J^T for each of the RESCALINGS of J;
    the first one that `_is_exact_enough` is kept, renormalised by its largest diagonal
    entry. Branch-free on purpose: a `lax.cond` taking a rescaled second pass only when
    needed was faster alone (ResNet-18 on CPU: 8 ms instead of 13 for K = 2, 20 instead of
    60 for K = 3), but it kept the gradients alive for its branch, which raised the planned
    scratch memory of the benchmark's `kd` step (112 px, batch 16) from 201 to 310 MiB.
    """
    num_objectives = jax.tree.leaves(stacked_tree)[0].shape[0]
    flags = jax.tree.leaves(expand_mask(shared_mask, stacked_tree))
    leaves = [leaf for flag, leaf in zip(flags, jax.tree.leaves(stacked_tree), strict=True) if flag]
    if not leaves:
        return jnp.zeros((num_objectives, num_objectives), jnp.float32), jnp.zeros((), jnp.float32)
    row_size = sum(leaf.size // num_objectives for leaf in leaves)
    candidates = _raw_grams(leaves, RESCALINGS)
    unit, factor = candidates[-1], jnp.float32(1.0 / RESCALINGS[-1])
    for raw, rescaling in reversed(list(zip(candidates[:-1], RESCALINGS[:-1], strict=True))):
        usable = _is_exact_enough(raw, row_size)
        unit = jnp.where(usable, raw, unit)
        factor = jnp.where(usable, jnp.float32(1.0 / rescaling), factor)
    top = jnp.max(jnp.diagonal(unit))
    return unit / nonzero(top), factor * jnp.sqrt(top)


def _is_exact_enough(raw: jax.Array, row_size: int) -> jax.Array:
    """Whether the Gram matrix `raw` of rows with `row_size` entries is as good as exact
    arithmetic would make it in float32: every entry finite, and the largest diagonal entry
    so far above float32's smallest normal number that products flushed to zero (at most
    `row_size` of them, each below that number) change no entry by more than float32's
    epsilon relative to it, i.e. by less than the normalised Gram matrix's own round-off."""
    info = jnp.finfo(jnp.float32)
    threshold = row_size * float(info.tiny) / float(info.eps)
    return jnp.all(jnp.isfinite(raw)) & (jnp.max(jnp.diagonal(raw)) >= threshold)


def _raw_grams(leaves: list[jax.Array], rescalings: Sequence[float]) -> list[jax.Array]:
    """(c J) (c J)^T in float32 for every c in `rescalings`, J the rows of the K-stacked
    `leaves` side by side.

    Each leaf is read once: ONE variadic reduction computes all K (K + 1) / 2 products of
    its rows for every rescaling together (`_pair_sums`), with the scaling, the casts and
    the products fused into it, and no reshape, slice or concatenation of a gradient is
    materialised.
    Alternatives measured on 2 CPU cores for ResNet-18 (11.7 M parameters, K = 2; see
    docs/benchmarks.md): the previous per-pair reductions after a separate peak pass, or
    concatenating the leaves into one [K, P] matrix (XLA copies it: 94 MB of scratch) and
    reducing or multiplying that, were all 4-10x slower. Under a mesh each device reduces
    its shard of a leaf and XLA gathers only the partial sums (seen in the compiled HLO on
    8 simulated devices, where the previous reshape to [K, n] gathered whole leaves).

    The leaves' [T] vectors of sums are then added elementwise.
    """
    num_objectives = leaves[0].shape[0]
    pairs = [(i, j) for i in range(num_objectives) for j in range(i, num_objectives)]
    # Behind a barrier, or XLA folds (x c) (y c) into (x y) c^2, which overflows again.
    factors = jax.lax.optimization_barrier([jnp.float32(c) for c in rescalings])
    terms = [(c, pair) for c in factors for pair in pairs]
    totals = iter(sum(_pair_sums(leaf, terms) for leaf in leaves))
    grams = []
    for _ in rescalings:
        entries = {pair: next(totals) for pair in pairs}
        grams.append(
            jnp.stack(
                [
                    jnp.stack([entries[min(i, j), max(i, j)] for j in range(num_objectives)])
                    for i in range(num_objectives)
                ]
            )
        )
    return grams


def _pair_sums(leaf: jax.Array, terms: list[tuple[jax.Array, tuple[int, int]]]) -> jax.Array:
    """[T]: sum((c leaf[i]) * (c leaf[j])) for every (c, (i, j)) in `terms`, in float32.

    Two levels, for float32 accuracy: the variadic reduction sums along the row's last axis
    (a leaf's channels or features) in a loop, then the [*row_shape[:-1]] arrays of partial
    sums it leaves, one per term, are stacked and reduced together. XLA's CPU loop
    accumulates serially, so one loop over a whole 2.4 M-entry row was 5e-4 off in relative
    terms (against float64), while the two levels match the per-pair reductions (5e-8) at
    the one loop's speed. A 1-D row (a bias, a norm's scale) is short and summed by the loop
    alone; a scalar one needs no sum.

    The second level is ONE reduction of the stacked partial sums, not one per term: that
    changes how long the step takes to compile and how much memory XLA plans for it, not
    what it computes or how fast it runs. One reduction per leaf and term made 1,000-2,000
    small reductions for a ResNet-18 (~120 leaves; 3 pairs for K = 2, 6 for K = 3, each for
    the 3 rescalings), each compiled as its own kernel on the CPU; one per leaf compiled a
    RetinaNet's K = 3 distillation step in 4.4-4.5 s instead of 6.0-6.6 s (2 CPU cores, the
    tests' compile flags). One reduction per term over every leaf's partial sums
    concatenated compiled faster still (4.0-4.1 s) but kept all of them alive together:
    `mokd`'s extra planned memory over `kd_1bwd` (ResNet-34 -> ResNet-18, 112 px, batch 16)
    rose from 1.11 to 1.18 gradient copies, while this one lowered it to 1.04. The `mokd`
    update alone on ResNet-18 gradients took the same time before and after
    (`aggregation_time`: 16.6-18.4 against 16.8-17.1 ms for K = 2, 28.4-29.4 against
    28.3-28.9 ms for K = 3, alternately in separate processes; docs/benchmarks.md).
    """
    rows = [leaf[k].astype(jnp.float32) for k in range(leaf.shape[0])]
    products = tuple((rows[i] * c) * (rows[j] * c) for c, (i, j) in terms)
    if leaf.ndim > 1:
        products = jax.lax.reduce(
            products,
            (jnp.zeros((), jnp.float32),) * len(products),
            lambda left, right: tuple(a + b for a, b in zip(left, right, strict=True)),
            (leaf.ndim - 2,),
        )
    return jnp.sum(jnp.stack([jnp.ravel(partial) for partial in products]), axis=1)


def combination_norm(gram: jax.Array, weights: jax.Array) -> jax.Array:
    """||sum_k w_k g_k|| in the units of `gram`; large weights cannot overflow the square."""
    peak = jnp.max(jnp.abs(weights))
    unit = weights / nonzero(peak)
    return peak * jnp.sqrt(jnp.maximum(dot(unit, dot(gram, unit)), 0.0))


def conflict_diagnostics(
    gram: jax.Array, names: Sequence[str] = ("task", "distill")
) -> dict[str, jax.Array]:
    """Conflict and dominance of each objective against objective 0 (the task), for logging.

    Args:
      gram: a Gram matrix, normally `gram_matrix`'s normalised one: both numbers are
        scale-free, and the EPS guards assume the largest gradient norm is about 1.
      names: the K objective names; names[0] is the task.

    Returns, for every objective k >= 1 named n:
      cos_task_<n>: cosine between g_0 and g_k (0 when either is zero);
      norm_ratio_<n>: ||g_k|| / ||g_0|| (about 1/EPS when g_0 is zero, 0 when both are).
    """
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    diagnostics = {}
    for k, name in enumerate(names[1:], start=1):
        cosine = safe_divide(gram[0, k], norms[0] * norms[k], 0.0, floor=EPS**2)
        diagnostics[f"cos_task_{name}"] = cosine
        diagnostics[f"norm_ratio_{name}"] = norms[k] / jnp.maximum(norms[0], EPS)
    return diagnostics


def pair_move(towards: jax.Array, away: jax.Array, weights: jax.Array) -> jax.Array:
    """e_towards - e_away in the dtype of `weights`: the direction of a pairwise step of the
    simplex solvers (one_hot's default dtype is float64 under x64, which would change a
    float32 loop carry's type)."""
    size = weights.shape[0]
    return jax.nn.one_hot(towards, size, dtype=weights.dtype) - jax.nn.one_hot(
        away, size, dtype=weights.dtype
    )


def min_norm_weights(gram: jax.Array, iterations: int = 100) -> jax.Array:
    """Weights w on the simplex minimising ||J^T w||^2 = w^T G w (the MGDA sub-problem).

    K = 2 uses the closed form (the min-norm point of the segment between g_1 and g_2),
    falling back to (0.5, 0.5) when the gradients (nearly) coincide, where every w gives the
    same direction.

    K > 2 runs `iterations` Frank-Wolfe steps from uniform weights with exact line search, in
    the pairwise variant: a step moves weight from one objective to another, w + s (e_t -
    e_a) with 0 <= s <= w_a, which keeps w on the simplex. Of the K^2 pairs it takes the one
    whose exact line search lowers the objective most (as SMO does for SVMs), a superset of
    the classic choice t = argmin (Gw), a = argmax over the support. Why not plain
    Frank-Wolfe: it converges like 1/iterations and was still ~5% off in d after 100 steps
    for K = 3; and why not the classic pair: in float32, with gradient norms 1e3 apart, it
    cycles on steps too small to change the weights while a useful pair waits. The count is
    fixed, so it traces to one `fori_loop` under jit.

    The solution does not change when G is multiplied by a positive number, so G is first
    normalised to largest diagonal 1: EPS is then relative, and callers may pass any positive
    multiple of a Gram matrix.
    """
    num_objectives = gram.shape[0]
    gram = gram / nonzero(jnp.max(jnp.diagonal(gram)))
    if num_objectives == 2:
        # Both weights straight from G (not w_2 = 1 - w_1), so that a weight far below
        # float32's 1e-7 resolution near 1 (one gradient 1e4 times longer) stays accurate.
        spread = gram[0, 0] + gram[1, 1] - 2.0 * gram[0, 1]
        pulls = jnp.stack([gram[1, 1] - gram[0, 1], gram[0, 0] - gram[0, 1]])
        return jnp.clip(safe_divide(pulls, spread, 0.5), 0.0, 1.0)

    norms2 = jnp.diagonal(gram)
    # Along e_t - e_a the objective is a parabola with this curvature, ||g_t - g_a||^2.
    curvature = norms2[:, None] + norms2[None, :] - 2.0 * gram

    def best_pair_step(_: int, weights: jax.Array) -> jax.Array:
        pull = dot(gram, weights)
        slope = pull[None, :] - pull[:, None]  # [t, a]: rate of decrease along e_t - e_a
        room = jnp.broadcast_to(weights[None, :], gram.shape)
        # No EPS floor on the curvature: objectives far shorter than the longest one may
        # still have to be balanced against each other. With no curvature the objective is
        # linear along the pair and falls all the way to s = w_a.
        step = jnp.clip(safe_divide(slope, curvature, room, floor=0.0), 0.0, room)
        gain = step * (2.0 * slope - step * curvature)
        towards, away = jnp.unravel_index(jnp.argmax(gain), gram.shape)
        moved = pair_move(towards, away, weights)
        return weights + step[towards, away] * moved

    uniform = jnp.full((num_objectives,), 1.0 / num_objectives, gram.dtype)
    return jax.lax.fori_loop(0, iterations, best_pair_step, uniform)


def clip_weights(
    gram: jax.Array, scale: jax.Array, weights: jax.Array, max_norm: float
) -> jax.Array:
    """`weights` shrunk so that ||sum_k w_k g_k|| <= max_norm in raw units (true Gram matrix
    scale**2 * gram); unchanged when already within."""
    length = scale * combination_norm(gram, weights)
    return weights * (max_norm / jnp.maximum(length, max_norm))
