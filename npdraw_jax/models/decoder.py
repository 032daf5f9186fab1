"""The decoder p(x | canvas): canvas -> likelihood parameters (spec section 6).

Two stride-2 ConvBN layers, two residual blocks, two stride-2 transposed
ConvBN layers, one more when the image is twice the canvas (CelebA), then a
3x3 convolution to the likelihood's parameter channels.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from npdraw_jax.models import layers


class Decoder(nn.Module):
  """canvas [B, Hc, Wc, C] -> parameters [B, H, W, out_channels], float32.

  Computes in `dtype` (parameters stay float32).
  """

  features: int
  out_channels: int
  upsample: int = 1  # Image side / canvas side: 1 or 2.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, canvas: jax.Array, train: bool) -> jax.Array:
    chex.assert_rank(canvas, 4)
    if self.upsample not in (1, 2):
      raise ValueError(f'The image must be 1 or 2 times the canvas, got {self.upsample}.')
    _, h, w, _ = canvas.shape
    x = layers.DownBody(self.features, dtype=self.dtype)(canvas, train)
    x = layers.ConvBN(2 * self.features, transpose=True, dtype=self.dtype)(x, train)
    x = layers.ConvBN(self.features, transpose=True, dtype=self.dtype)(x, train)
    if self.upsample == 2:
      x = layers.ConvBN(self.features, transpose=True, dtype=self.dtype)(x, train)
    # The likelihood is evaluated in float32.
    out = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(x).astype(jnp.float32)
    chex.assert_shape(out, (canvas.shape[0], h * self.upsample, w * self.upsample, None))
    return out
