"""The model contract's shared part: stages with feature taps, `classify` and `__call__`."""

import flax.linen as nn
import jax


class StagedClassifier(nn.Module):
    """What every model family shares: running the stages with their taps, and the
    contract's `classify` and `__call__`. A subclass defines `encode` and, in its setup,
    `stages` (lists of blocks called as `block(x, train)`) and an `fc` Dense head."""

    def _run_stages(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The last stage's output and the taps `stage{i}` (each stage's output)."""
        features = {}
        for stage, blocks in enumerate(self.stages, start=1):
            for block in blocks:
                x = block(x, train)
            features[f"stage{stage}"] = x
        return x, features

    def classify(self, pooled: jax.Array) -> jax.Array:
        return self.fc(pooled)

    def __call__(
        self, images: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        features = self.encode(images, train)
        logits = self.classify(features["pooled"])
        return (logits, features) if return_features else logits
