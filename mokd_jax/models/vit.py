"""timm's VisionTransformer, as DeiT uses it (`deit_tiny_patch16_224`, `deit_small_...`).

Patch embedding (a conv with kernel and stride `patch_size`), a learned class token
prepended, a learned position embedding added (one entry per patch at `image_size`, plus the
class token's), `depth` pre-norm blocks (x + attn(LN(x)), then x + mlp(LN(x)); fused qkv
projection, `num_heads` heads; mlp: fc1 to 4x the width, exact GELU, fc2), a final
LayerNorm, and the head on the class token. LayerNorms use eps 1e-6; there is no dropout
(DeiT trains with drop-path, which timm leaves at 0 unless asked).

The model contract of `cnn.ConvNet` with transformer taps: `tokens` is the final-norm
sequence [B, 1 + patches, embed_dim] (timm's `forward_features`; the class token first),
`pooled` its class token [B, embed_dim]. Images are NHWC of exactly `image_size` pixels,
which fixes the position embedding's length (timm's `img_size`).

Initialisation is timm's (weight_init ''): Linear weights normal(0, 0.02) (timm's
trunc_normal_(std=.02) truncates at +-2 absolute, i.e. at 100 std: no truncation in
effect) with zero biases, position embedding normal(0, 0.02), class token normal(0, 1e-6),
LayerNorm 1/0, and torch's default init for the patch-embedding conv (timm leaves it).
Stochastic depth (timm's drop_path, DeiT's --drop-path 0.1 for DeiT-Ti/S): in train mode,
block i skips each of its two residual branches for a whole example with probability
drop_path_rate * i / (depth - 1) (timm's `torch.linspace(0, drop_path_rate, depth)`), and
scales kept branches by 1 / (1 - rate). Its randomness is the 'dropout' rng stream, which
the training steps pass per step (`mokd_jax.steps.dropout_rngs`); Flax folds each block's
path into it, so the blocks draw independently. Evaluation (train=False) never drops.

In bfloat16 the residual stream stays float32 (the branches compute in bfloat16 and are
added to it in float32) and the attention logits are accumulated and softmaxed in float32,
as torch's autocast keeps them.

Parameter names map one to one onto timm state-dict keys (`flax path <- timm key`; the
patch conv kernel HWIO for torch's OIHW, Dense kernels the transpose of torch's weight,
LayerNorm `scale`, `bias` for weight, bias; `cls_token` [1, 1, D] and `pos_embed`
[1, 1 + patches, D] as they are):
    cls_token, pos_embed                      <- cls_token, pos_embed
    patch_embed/proj                          <- patch_embed.proj
    blocks_{i}/norm1, /norm2                  <- blocks.{i}.norm1, .norm2
    blocks_{i}/attn/qkv, /attn/proj           <- blocks.{i}.attn.qkv, .attn.proj
    blocks_{i}/mlp/fc1, /mlp/fc2              <- blocks.{i}.mlp.fc1, .mlp.fc2
    norm, head                                <- norm, head
The fused qkv kernel [D, 3D] keeps timm's output order (q, k, v, then heads, then head
dims), so the transposed torch weight drops in as is.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from mokd_jax.errors import invalid
from mokd_jax.models.base import StagedClassifier
from mokd_jax.models.layers import torch_default_init, uniform
from mokd_jax.models.stored import stored_whole

_linear_init = nn.initializers.normal(0.02)


def _dense(features: int, dtype: Dtype) -> nn.Dense:
    """timm's Linear init: normal(0, 0.02) weight, zero bias."""
    return nn.Dense(features, kernel_init=_linear_init, dtype=dtype)


def _layer_norm(dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm(eps=1e-6) with torch's two-pass variance (Flax's default E[x^2] - E[x]^2
    loses digits on a residual stream whose mean is large)."""
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype)


@jax.custom_vjp
def attention_softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis whose backward pass reads only its output p:
    d logits = p * (g - sum(g * p)), the rule torch's softmax backward uses.

    Why not `jax.nn.softmax` as it is: XLA rewrites its derivative in terms of exp(logits -
    max) and a [B, heads, N, N] broadcast of 1 / sum, and keeps those for the backward pass
    besides p. With K pullbacks of one forward pass (MoKD's per-objective gradients), XLA
    merges the K identical broadcasts and computes them during the forward pass, so one
    more attention-sized buffer per block stays alive through it: for RegNetY-160 ->
    DeiT-S at 224 px, batch 16, on CPU, `mokd`'s planned peak was 1.96 gradient copies over
    `kd_1bwd`'s, growing with the batch (docs/benchmarks.md). With this rule only p is
    saved: -0.06 copies, both steps' peaks lower (`kd_1bwd` 2888 -> 2547 MiB, `mokd` 3053
    -> 2541 MiB), and DeiT-S's forward and backward no slower. Like every `custom_vjp`,
    it has no forward-mode derivative (`jax.jvp`); nothing in the trainer takes one.
    """
    return jax.nn.softmax(logits, axis=-1)


def _attention_softmax_forward(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    probabilities = jax.nn.softmax(logits, axis=-1)
    return probabilities, probabilities


def _attention_softmax_backward(probabilities: jax.Array, cotangent: jax.Array) -> tuple[jax.Array]:
    inner = jnp.sum(cotangent * probabilities, axis=-1, keepdims=True)
    return (probabilities * (cotangent - inner),)


attention_softmax.defvjp(_attention_softmax_forward, _attention_softmax_backward)


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each projected to `embed_dim`: [B, H, W, 3] ->
    [B, (H / p) * (W / p), embed_dim], patches in row-major order as torch's flatten."""

    embed_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32

    def setup(self):
        fan_in = 3 * self.patch_size**2
        self.proj = nn.Conv(
            self.embed_dim,
            (self.patch_size, self.patch_size),
            strides=self.patch_size,
            padding="VALID",
            kernel_init=torch_default_init,
            bias_init=uniform(fan_in**-0.5),
            dtype=self.dtype,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.proj(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused qkv projection."""

    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.qkv = _dense(3 * self.dim, self.dtype)
        self.proj = _dense(self.dim, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
        logits = jnp.einsum(
            "bqhd,bkhd->bhqk", q * head_dim**-0.5, k, preferred_element_type=jnp.float32
        )
        weights = attention_softmax(logits).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.proj(out.reshape(batch, tokens, self.dim))


class Mlp(nn.Module):
    """fc1 -> exact GELU (torch's nn.GELU) -> fc2."""

    dim: int
    hidden: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.fc1 = _dense(self.hidden, self.dtype)
        self.fc2 = _dense(self.dim, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nn.gelu(self.fc1(x), approximate=False))


def drop_path(branch: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """timm's drop_path: each example's `branch` [B, ...] zeroed with probability `rate`,
    kept ones scaled by 1 / (1 - rate); the identity where `key` is None (evaluation)."""
    if key is None or rate == 0.0:
        return branch
    keep = jax.random.bernoulli(key, 1.0 - rate, (branch.shape[0],) + (1,) * (branch.ndim - 1))
    return jnp.where(keep, branch / (1.0 - rate), 0.0).astype(branch.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then
    x + drop_path(mlp(norm2(x))), the residual stream x in float32."""

    dim: int
    num_heads: int
    mlp_ratio: float
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0

    def setup(self):
        self.norm1 = _layer_norm(self.dtype)
        self.attn = Attention(self.dim, self.num_heads, self.dtype)
        self.norm2 = _layer_norm(self.dtype)
        self.mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dtype)

    def residual(self, x: jax.Array, branch: jax.Array, train: bool) -> jax.Array:
        """x + drop_path(branch), stored whole (`stored_whole`: on CPU the backward pass
        would otherwise recompute the stream from every earlier branch)."""
        key = self.make_rng("dropout") if train and self.drop_path_rate > 0 else None
        return stored_whole(x + drop_path(branch, self.drop_path_rate, key).astype(jnp.float32))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.residual(x, self.attn(self.norm1(x)), train)
        return self.residual(x, self.mlp(self.norm2(x)), train)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """timm's per-block rates: `torch.linspace(0, rate, depth)`, 0 for the first block."""
    return [rate * index / max(depth - 1, 1) for index in range(depth)]


class VisionTransformer(StagedClassifier):
    """timm's VisionTransformer with a class token (see the module docstring); the
    defaults are ViT/DeiT-Ti's but for `embed_dim` and `num_heads`."""

    num_classes: int
    embed_dim: int
    num_heads: int
    depth: int = 12
    mlp_ratio: float = 4.0
    image_size: int = 224
    patch_size: int = 16
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0
    head_name = "head"

    def setup(self):
        if self.image_size % self.patch_size:
            raise invalid(
                "image_size", self.image_size, f"a multiple of patch_size={self.patch_size}"
            )
        num_patches = (self.image_size // self.patch_size) ** 2
        self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, self.dtype)
        self.cls_token = self.param(
            "cls_token", nn.initializers.normal(1e-6), (1, 1, self.embed_dim)
        )
        self.pos_embed = self.param("pos_embed", _linear_init, (1, 1 + num_patches, self.embed_dim))
        self.blocks = [
            Block(self.embed_dim, self.num_heads, self.mlp_ratio, self.dtype, rate)
            for rate in drop_path_rates(self.drop_path_rate, self.depth)
        ]
        self.norm = _layer_norm(self.dtype)
        self.head = _dense(self.num_classes, self.dtype)

    @property
    def feature_width(self) -> int:
        """Width of features['pooled'], known without running the model."""
        return self.embed_dim

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """`train` switches stochastic depth on (the 'dropout' rng then required)."""
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise invalid(
                "images",
                f"{images.shape[1]}x{images.shape[2]} pixels",
                f"{self.image_size}x{self.image_size}, the model's image_size",
            )
        x = self.patch_embed(images).astype(jnp.float32)  # the float32 residual stream
        cls_token = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls_token, x], axis=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, train)
        tokens = self.norm(x)
        return {"tokens": tokens, "pooled": tokens[:, 0]}
