"""The posterior q(z | x): per-step logits of pres, where and what (spec section 5).

A CNN body (stride-2 convolutions, batch norm, ReLU, residual blocks) and one
of two heads predicting all T steps at once:
- 'mlp': the flattened feature map -> dense -> T * (1 + L + K) logits.
- 'fcn': the feature map resized to sqrt(T) x sqrt(T), a 1x1 convolution per
  cell; step t is cell t in raster order (T must be a square).
"""

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from npdraw_jax.models import layers

HEADS = ('mlp', 'fcn')


class Encoder(nn.Module):
  """x [B, H, W, C] -> {'pres': [B, T], 'where': [B, T, L], 'what': [B, T, K]}, float32.

  Computes in `dtype` (parameters stay float32).
  """

  num_steps: int
  num_locations: int
  num_parts: int
  features: int
  head: str
  hidden: int = 512
  dtype: Any = jnp.float32

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f'model.encoder_head must be one of {HEADS}, got {self.head!r}.')
    if self.head == 'fcn' and math.isqrt(self.num_steps) ** 2 != self.num_steps:
      raise ValueError(f"The 'fcn' head needs a square number of steps, got T = {self.num_steps}.")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    chex.assert_rank(x, 4)
    batch = x.shape[0]
    width = 1 + self.num_locations + self.num_parts
    h = layers.DownBody(self.features, dtype=self.dtype)(x, train)
    if self.head == 'mlp':
      h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(h.reshape(batch, -1)))
      logits = nn.Dense(self.num_steps * width, dtype=self.dtype)(h)
    else:
      side = math.isqrt(self.num_steps)
      h = jax.image.resize(h, (batch, side, side, h.shape[-1]), 'bilinear')
      logits = nn.Conv(width, (1, 1), dtype=self.dtype)(h)
    # The latents and losses are computed from float32 logits.
    logits = logits.reshape(batch, self.num_steps, width).astype(jnp.float32)
    return {
      'pres': logits[..., 0],
      'where': logits[..., 1 : 1 + self.num_locations],
      'what': logits[..., 1 + self.num_locations :],
    }
