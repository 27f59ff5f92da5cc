"""mokd_jax.torch_peer_weights: the PyTorch peer's closed-form MoKD weights for K = 2 are
our `mokd` aggregator's."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def torch_peer_weights():
    pytest.importorskip("torch")
    from mokd_jax import torch_peer_weights

    return torch_peer_weights


def our_mokd_weights(rows, losses, max_norm):
    """Our `mokd` aggregator's raw weights for the gradient rows [2, P]."""
    import jax.numpy as jnp

    from mokd_jax.aggregation import min_norm

    gram = (rows @ rows.T).astype(np.float32)
    scale = np.sqrt(gram.diagonal().max()) or 1.0
    weighting = min_norm.mokd(2, max_norm=max_norm)
    state = weighting.weigh(
        jnp.asarray(gram / scale**2), jnp.asarray(scale), jnp.asarray(losses), weighting.init()
    )
    return np.asarray(state.weights)


def peer_mokd_weights(torch_peer_weights, rows, losses, max_norm):
    import torch

    gram = torch.from_numpy((rows @ rows.T).astype(np.float32))
    return torch_peer_weights.mokd_coefficients(gram, torch.from_numpy(losses), max_norm).numpy()


@pytest.mark.parametrize("max_norm", [None, 10.0, 1e-3])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (1.0, 30.0), (1e-3, 1.0)])
def test_peer_mokd_coefficients_are_our_aggregator_weights(torch_peer_weights, max_norm, scales):
    """Random gradient pairs of very different norms and losses, with the clip off, loose
    and biting: the closed form for K = 2 gives our `mokd` aggregator's raw weights."""
    rng = np.random.default_rng(len(str(scales)) + int(max_norm or 0))
    rows = rng.normal(size=(2, 50)) * np.asarray(scales)[:, None]
    rows[1] += 0.5 * rows[0]  # some agreement, so the min-norm point is inside the segment
    losses = np.array([2.3, 0.4], np.float32)
    peer = peer_mokd_weights(torch_peer_weights, rows, losses, max_norm)
    np.testing.assert_allclose(peer, our_mokd_weights(rows, losses, max_norm), rtol=1e-5)


@pytest.mark.parametrize(
    "rows, losses, expected",
    [
        # opposite gradients, equal losses: the min-norm point and the mean both vanish
        ([[1.0, 2.0], [-1.0, -2.0]], [1.0, 1.0], [0.0, 0.0]),
        # a zero task gradient: uniform log-loss weights, d along the distillation
        # gradient with the norm of g_1 + g_2 = (0, 2): c_2 = 1
        ([[0.0, 0.0], [0.0, 2.0]], [1.0, 0.5], [1.0, 1.0]),
        # orthogonal unit gradients, equal losses: pi = (1/2, 1/2), rescaled to ||g1 + g2||
        ([[1.0, 0.0], [0.0, 1.0]], [2.0, 2.0], [1.0, 1.0]),
    ],
)
def test_peer_mokd_coefficients_in_hand_computed_cases(torch_peer_weights, rows, losses, expected):
    rows, losses = np.asarray(rows), np.asarray(losses, np.float32)
    peer = peer_mokd_weights(torch_peer_weights, rows, losses, 10.0)
    np.testing.assert_allclose(peer, our_mokd_weights(rows, losses, 10.0), atol=1e-6)
    np.testing.assert_allclose(rows.T @ peer, rows.T @ np.asarray(expected), atol=1e-6)
