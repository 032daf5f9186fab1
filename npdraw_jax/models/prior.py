"""The Transformer prior over drawing steps (spec section 4).

p(z) = prod_t p(pres_t, where_t, what_t | c_{t-1}, m_{t-1}, t). Token t embeds
the state before step t (canvas and location map) with a small CNN plus a
learned step embedding; a causal pre-LayerNorm Transformer reads the tokens
and three heads give the logits of step t.

With `decode=True` the attention layers keep keys and values in the 'cache'
collection and the model takes one token per call (see sampling.py).
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from npdraw_jax.models import layers


class TokenCNN(nn.Module):
  """[N, H, W, C + 1] canvas and map -> [N, d_model] token."""

  features: int
  d_model: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    x = nn.gelu(nn.Conv(self.features, (3, 3), strides=(2, 2), dtype=self.dtype)(x))
    x = nn.gelu(nn.Conv(2 * self.features, (3, 3), strides=(2, 2), dtype=self.dtype)(x))
    return nn.Dense(self.d_model, dtype=self.dtype)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
  """Pre-LayerNorm causal self-attention and MLP, each with a residual."""

  num_heads: int
  mlp_ratio: int
  dropout: float
  decode: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    d_model = x.shape[-1]
    # In decode mode the cache itself masks the future.
    mask = None if self.decode else nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.dropout,
      deterministic=not train,
      decode=self.decode,
      dtype=self.dtype,
    )(nn.LayerNorm(dtype=self.dtype)(x), mask=mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(self.mlp_ratio * d_model, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x))
    y = nn.Dense(d_model, dtype=self.dtype)(nn.gelu(y))
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Prior(nn.Module):
  """Causal Transformer over the T drawing steps.

  Attributes:
    num_steps: T.
    num_parts: K.
    num_locations: L.
    token_features: channels of the token CNN.
    d_model: Transformer width.
    num_layers: Transformer blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / d_model.
    dropout: dropout rate (attention, residuals).
    decode: one token per call with a key/value cache.
    dtype: compute dtype (parameters stay float32; the logits are float32).
  """

  num_steps: int
  num_parts: int
  num_locations: int
  token_features: int
  d_model: int
  num_layers: int
  num_heads: int
  mlp_ratio: int
  dropout: float
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, canvases: jax.Array, maps: jax.Array, steps: jax.Array, train: bool = False
  ) -> dict[str, jax.Array]:
    """Logits of the steps whose prior states are given.

    Args:
      canvases: [B, S, H, W, C] canvas before each step (S = T, or 1 in decode).
      maps: [B, S, H, W, 1] location map before each step.
      steps: [S] int step indices.
      train: enables dropout (rng stream 'dropout').

    Returns:
      {'pres': [B, S], 'where': [B, S, L], 'what': [B, S, K]} logits.
    """
    batch, length = canvases.shape[:2]
    chex.assert_rank(canvases, 5)
    chex.assert_shape(maps, (batch, length, *canvases.shape[2:4], 1))
    chex.assert_shape(steps, (length,))
    x = jnp.concatenate([canvases, maps], axis=-1)
    x = TokenCNN(self.token_features, self.d_model, self.dtype)(x.reshape(-1, *x.shape[2:]))
    x = x.reshape(batch, length, self.d_model)
    x = x + nn.Embed(self.num_steps, self.d_model, dtype=self.dtype)(steps)[None]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for _ in range(self.num_layers):
      x = Block(self.num_heads, self.mlp_ratio, self.dropout, self.decode, self.dtype)(x, train)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    head = lambda size, name: nn.Dense(size, dtype=self.dtype, name=name)(x).astype(jnp.float32)
    return {
      'pres': head(1, 'pres_head')[..., 0],
      'where': head(self.num_locations, 'where_head'),
      'what': head(self.num_parts, 'what_head'),
    }


def make_prior(config: ml_collections.ConfigDict, num_locations: int) -> Prior:
  """The prior a configuration describes (L comes from the canvas grid)."""
  p = config.prior
  return Prior(
    num_steps=config.model.T,
    num_parts=config.model.K,
    num_locations=num_locations,
    token_features=p.token_features,
    d_model=p.d_model,
    num_layers=p.num_layers,
    num_heads=p.num_heads,
    mlp_ratio=p.mlp_ratio,
    dropout=p.dropout,
    dtype=layers.compute_dtype(config.model.compute_dtype),
  )
