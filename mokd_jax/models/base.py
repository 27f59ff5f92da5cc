"""The model contract's shared part: stages with feature taps, `classify` and `__call__`."""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp


class StagedClassifier(nn.Module):
    """What every model family shares: running the stages with their taps, and the
    contract's `classify` and `__call__`. A subclass defines `encode`, a `dtype` field (the
    computation dtype) and, in its setup, a Dense head under the attribute `head_name` and,
    to use `_run_stages`, `stages` (lists of blocks called as `block(x, train)`)."""

    # The head's attribute, hence parameter, name: the reference torch model's, so that
    # parameter paths map onto its state-dict keys.
    head_name: ClassVar[str] = "fc"

    def _run_stages(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The last stage's output and the taps `stage{i}` (each stage's output)."""
        features = {}
        for stage, blocks in enumerate(self.stages, start=1):
            for block in blocks:
                x = block(x, train)
            features[f"stage{stage}"] = x
        return x, features

    def classify(self, pooled: jax.Array) -> jax.Array:
        """Logits, float32 whatever the computation dtype, so that every loss is float32."""
        return getattr(self, self.head_name)(pooled).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        features = self.encode(images, train)
        logits = self.classify(features["pooled"])
        return (logits, features) if return_features else logits
