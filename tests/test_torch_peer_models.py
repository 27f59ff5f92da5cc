"""mokd_jax.torch_peer_models and the peer's choice of them (`torch_peer.peer_model`): the
torch networks the benchmark times against ours are ours, layer for layer (their outputs
on converted weights are checked in tests/test_convert.py)."""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mokd_jax import models  # noqa: E402  (after the torch check)
from mokd_jax.models.vit import drop_path_rates  # noqa: E402
from mokd_jax.state import init_model  # noqa: E402
from mokd_jax.torch_peer import peer_model  # noqa: E402
from mokd_jax.torch_peer_models import DropPath, TorchViT  # noqa: E402


def test_drop_path_keeps_or_drops_whole_samples_in_training():
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    kept = drop(torch.ones(256, 3, 4))
    per_sample = kept.reshape(256, -1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0.35 < (per_sample[:, 0] > 0).float().mean() < 0.65
    assert torch.equal(drop.eval()(torch.ones(4, 3)), torch.ones(4, 3))


def test_vit_drop_path_rates_rise_from_zero_like_ours():
    model = TorchViT(10, dim=16, num_heads=2, depth=5, image_size=32, drop_path_rate=0.2)
    rates = [(block.drop_path1.rate, block.drop_path2.rate) for block in model.blocks]
    assert rates == [(rate, rate) for rate in drop_path_rates(0.2, 5)]
    assert rates[0] == (0.0, 0.0) and rates[-1][0] == pytest.approx(0.2)


def parameter_count(arch: str, image_size: int) -> int:
    module = models.get(arch, 1000, image_size=image_size)
    shapes = jax.eval_shape(
        functools.partial(init_model, module, (image_size, image_size, 3)), jax.random.key(0)
    )["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize(
    ("arch", "image_size"),
    [("regnety_160", 224), ("deit_small", 224), ("deit_small", 64), ("vit_tiny", 112)],
)
def test_the_peer_builds_our_network(arch, image_size):
    """Same parameter count as ours (timm's own at 224 px: tests/test_model_zoo.py), the
    position embedding of the image size, and DeiT's drop-path where ours has it. Built on
    the meta device: no weights are allocated."""
    with torch.device("meta"):
        peer = peer_model(arch, 1000, image_size)
    assert sum(p.numel() for p in peer.parameters()) == parameter_count(arch, image_size)
    if arch != "regnety_160":
        tokens = 1 + (image_size // 16) ** 2
        assert tuple(peer.pos_embed.shape) == (1, tokens, peer.pos_embed.shape[-1])
        expected = models.get(arch, 1000, image_size=image_size).drop_path_rate
        assert peer.blocks[-1].drop_path1.rate == pytest.approx(expected)
