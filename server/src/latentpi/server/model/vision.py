"""SigLIP ViT (big_vision style), with openpi's parameter names, scanned over its blocks.

Axes: B batch, L tokens, D width. Patch embedding and position embedding run in float32 (as openpi
does, for safety); the encoder runs in the model dtype. No pooling: every patch is a token, and
`head` projects it to the language model's width.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from latentpi.server.model.configs import VisionConfig


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: str

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
        x = nn.gelu(x)  # flax's default: the tanh approximation, as SigLIP was trained
        return nn.Dense(width, dtype=self.dtype)(x)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block; shaped `(carry, _) -> (carry, None)` for `nn.scan`."""

    mlp_dim: int
    num_heads: int
    dtype: str

    @nn.compact
    def __call__(self, x: jnp.ndarray, _: None = None) -> tuple[jnp.ndarray, None]:
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype)(y)
        return x, None


class Encoder(nn.Module):
    config: VisionConfig
    dtype: str

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        # Stacked block params (leading axis = depth), as in the checkpoints.
        blocks = nn.scan(
            EncoderBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.config.depth,
        )(
            mlp_dim=self.config.mlp_dim,
            num_heads=self.config.num_heads,
            dtype=self.dtype,
            name="encoderblock",
        )
        x, _ = blocks(x, None)
        return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)


class SigLIP(nn.Module):
    """Images (B, H, W, 3) in [-1, 1] -> tokens (B, num_tokens, out_width) in the model dtype."""

    config: VisionConfig
    out_width: int
    dtype: str

    @nn.compact
    def __call__(self, image: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        image = jnp.asarray(image, jnp.float32)
        x = nn.Conv(
            cfg.width,
            cfg.patch_size,
            strides=cfg.patch_size,
            padding="VALID",
            name="embedding",
            dtype=jnp.float32,
        )(image)
        batch, height, width, channels = x.shape
        x = jnp.reshape(x, (batch, height * width, channels))
        pos = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=channels**-0.5),
            (1, height * width, channels),
            jnp.float32,
        )
        x = (x + pos).astype(self.dtype)
        x = Encoder(cfg, self.dtype, name="Transformer")(x)
        return nn.Dense(self.out_width, dtype=self.dtype, name="head")(x)
