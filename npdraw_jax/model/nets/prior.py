"""The Transformer prior over drawing steps (docs/model.md, section 4).

p(z) = prod_t p(pres_t, where_t, what_t | c_{t-1}, m_{t-1}, t). Token t embeds
the state before step t (canvas and location map) with a small CNN; a causal
pre-LayerNorm Transformer reads the tokens and three heads give the logits of
step t. Two families, picked by config.model.networks:

- 'authors' (AuthorsPrior): the reference prior of docs/model.md, section 11. A learned
  class token opens the sequence and learned position embeddings are added.
- 'ours' (OursPrior): this project's earlier prior, with a step embedding, a
  final LayerNorm and linear heads.

Both take the same call. With `decode=True` the attention layers keep keys and
values in the 'cache' collection and the model takes one token per call;
`initial_cache` gives the cache before the first step (see sampling.py).
Attention without a cache, dropout masks and GELU run in the `kernels` form
(platform_kernels.FORMS); the parameters are the same in either.
"""

import functools
import math
from typing import Any, TypeAlias

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import platform_kernels
from npdraw_jax.model.nets import dropout, layers

# PyTorch's nn.LayerNorm default, which the authors' blocks use.
AUTHORS_LAYER_NORM_EPSILON = 1e-5


def _check_inputs(canvases: jax.Array, maps: jax.Array, steps: jax.Array) -> None:
  """The shapes of a prior call: [B, S, H, W, C], [B, S, H, W, 1], [S]."""
  chex.assert_rank(canvases, 5)
  batch, length = canvases.shape[:2]
  chex.assert_shape(maps, (batch, length, *canvases.shape[2:4], 1))
  chex.assert_shape(steps, (length,))


# --- 'authors' ---------------------------------------------------------------


class AuthorsTokenCNN(nn.Module):
  """[N, H, W, C + 1] canvas and map -> [N, d_model] token.

  conv3x3 stride 2 pad 1 + ReLU, conv1x1 (no activation), flatten, linear.
  """

  features: int
  d_model: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    # Explicit padding 1, as PyTorch's: 'SAME' pads (0, 1) at stride 2.
    x = nn.relu(nn.Conv(self.features, (3, 3), strides=(2, 2), padding=1, dtype=self.dtype)(x))
    x = nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)
    return nn.Dense(self.d_model, dtype=self.dtype)(x.reshape(x.shape[0], -1))


class _Projection(nn.Module):
  """The parameters of one nn.DenseGeneral, made and initialised as it makes them
  (lecun_normal on the flattened [inputs, outputs] kernel, zero bias), for the
  attention to combine before use. Returns (kernel, bias or None)."""

  shape: tuple[int, ...]
  inputs: int  # How many leading kernel axes are inputs.
  use_bias: bool = False

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array | None]:
    fan_in = math.prod(self.shape[: self.inputs])

    def init(key, shape, dtype=jnp.float32):
      flat = (fan_in, math.prod(shape) // fan_in)
      return nn.initializers.lecun_normal()(key, flat, dtype).reshape(shape)

    kernel = self.param('kernel', init, self.shape)
    if not self.use_bias:
      return kernel, None
    return kernel, self.param('bias', nn.initializers.zeros_init(), self.shape[self.inputs :])


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention in which a query sees the keys at positions <= its own.

  q, k, v: bias-free projections to num_heads x head_dim; softmax(q k / sqrt(head_dim)) v,
  projected back to the input width with a bias. With `decode=True` each call
  writes its keys and values into a 'cache' of max_length positions at their
  positions (one call's positions are consecutive) and its queries read the
  whole cache: slots not yet written lie at later positions, so the same mask
  hides them. Without a cache, the 'cpu' form folds heads wider than half the
  input (platform_kernels.folds_heads).
  """

  num_heads: int
  head_dim: int
  max_length: int
  decode: bool
  dtype: Any = jnp.float32
  kernels: str = 'cpu'  # platform_kernels.FORMS.

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, S, D] inputs at positions [S] -> [B, S, D]."""
    _, length, width = x.shape
    chex.assert_shape(positions, (length,))
    heads = (self.num_heads, self.head_dim)
    w_query, w_key, w_value = (
      _Projection((width, *heads), 1, name=name)()[0] for name in ('query', 'key', 'value')
    )
    w_out, bias = _Projection((*heads, width), 2, use_bias=True, name='out')()
    visible = positions[:, None] >= positions[None, :]
    x = x.astype(self.dtype)
    if not self.decode and platform_kernels.folds_heads(width, self.head_dim, self.kernels):
      weights = lambda logits: self._softmax(logits, visible[:, None, :])
      y = platform_kernels.folded_attention(x, w_query, w_key, w_value, w_out, weights)
    else:
      query, key, value = (
        jnp.einsum('bsd,dhj->bshj', x, w.astype(self.dtype)) for w in (w_query, w_key, w_value)
      )
      if self.decode:
        key, value = self._cached(key, value, positions)
        visible = positions[:, None] >= jnp.arange(self.max_length)[None, :]
      logits = jnp.einsum('bqhd,bkhd->bhqk', query, key).astype(jnp.float32)
      weights = self._softmax(logits * self.head_dim**-0.5, visible)
      y = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
      y = jnp.einsum('bqhd,hdf->bqf', y, w_out.astype(self.dtype))
    return y + bias.astype(self.dtype)

  def _softmax(self, logits: jax.Array, visible: jax.Array) -> jax.Array:
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits).astype(self.dtype)

  def _cached(self, key: jax.Array, value: jax.Array, positions: jax.Array):
    """Writes this call's keys and values into the cache; returns the whole cache."""
    shape = (key.shape[0], self.max_length, self.num_heads, self.head_dim)
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, shape, key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, shape, value.dtype)
    start = (0, positions[0], 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
    return cached_key.value, cached_value.value


class AuthorsBlock(nn.Module):
  """x + Dropout(Attn(LN(x))), then x + FF(LN(x)), FF = Dense, GELU, Dropout, Dense, Dropout."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float
  max_length: int
  decode: bool
  dtype: Any = jnp.float32
  kernels: str = 'cpu'  # platform_kernels.FORMS.

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, train: bool) -> jax.Array:
    layer_norm = functools.partial(
      nn.LayerNorm, epsilon=AUTHORS_LAYER_NORM_EPSILON, dtype=self.dtype
    )
    drop = functools.partial(
      dropout.Dropout, self.dropout, deterministic=not train, kernels=self.kernels
    )
    y = CausalSelfAttention(
      self.num_heads, self.head_dim, self.max_length, self.decode, self.dtype, self.kernels
    )(layer_norm()(x), positions)
    x = x + drop()(y)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(layer_norm()(x))
    # PyTorch's exact GELU, as the authors' blocks use.
    y = drop()(platform_kernels.exact_gelu(y, self.kernels))
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(y)
    return x + drop()(y)


class AuthorsHead(nn.Module):
  """[..., D] -> [..., size]: Dense(D) + ReLU + Dense(size)."""

  size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(x.shape[-1], dtype=self.dtype)(x))
    return nn.Dense(self.size, dtype=self.dtype)(x)


class AuthorsPrior(nn.Module):
  """The authors' causal Transformer over [class token, token(c_0), ..., token(c_{T-1})].

  Position 0 holds the class token and position t + 1 the state before step t;
  the output at position t + 1 gives step t's logits. In decode mode `prime`
  writes the class token into the cache, once, before step 0.

  Attributes:
    num_steps: T.
    num_parts: K.
    num_locations: L.
    token_features: channels of the token CNN.
    d_model: Transformer width.
    num_layers: Transformer blocks.
    num_heads: attention heads.
    head_dim: width of one head.
    mlp_dim: hidden width of each block's MLP.
    dropout: dropout rate (embeddings, attention output, MLP).
    decode: one token per call with a key/value cache.
    dtype: compute dtype (parameters stay float32; the logits are float32).
    history: which steps' boxes the location maps it reads hold
      (canvas.PRIOR_HISTORIES); whoever renders its input reads it here.
    kernels: the form of its attention, dropout and GELU (platform_kernels.FORMS).
  """

  num_steps: int
  num_parts: int
  num_locations: int
  token_features: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float
  decode: bool = False
  dtype: Any = jnp.float32
  history: str = 'drawn'
  kernels: str = 'cpu'

  def setup(self):
    self.token_cnn = AuthorsTokenCNN(self.token_features, self.d_model, self.dtype)
    init = nn.initializers.normal(stddev=1.0)
    self.class_token = self.param('class_token', init, (self.d_model,))
    # The authors' table has T^2 + 1 rows, of which the first T + 1 are used.
    self.position_embedding = self.param(
      'position_embedding', init, (self.num_steps**2 + 1, self.d_model)
    )
    self.embedding_dropout = dropout.Dropout(self.dropout, kernels=self.kernels)
    self.blocks = [
      AuthorsBlock(
        self.num_heads,
        self.head_dim,
        self.mlp_dim,
        self.dropout,
        self.num_steps + 1,
        self.decode,
        self.dtype,
        self.kernels,
      )
      for _ in range(self.num_layers)
    ]
    self.pres_head = AuthorsHead(1, self.dtype)
    self.where_head = AuthorsHead(self.num_locations, self.dtype)
    self.what_head = AuthorsHead(self.num_parts, self.dtype)

  def _embed_positions(self, positions: jax.Array) -> jax.Array:
    return jnp.take(self.position_embedding, positions, axis=0).astype(self.dtype)

  def _class_embedding(self, batch: int) -> jax.Array:
    """[B, 1, D]: the class token at position 0."""
    x = self.class_token.astype(self.dtype) + self._embed_positions(jnp.zeros((), jnp.int32))
    return jnp.broadcast_to(x, (batch, 1, self.d_model))

  def _transform(self, x: jax.Array, positions: jax.Array, train: bool) -> jax.Array:
    x = self.embedding_dropout(x, deterministic=not train)
    for block in self.blocks:
      x = block(x, positions, train)
    return x

  def __call__(
    self, canvases: jax.Array, maps: jax.Array, steps: jax.Array, train: bool = False
  ) -> dict[str, jax.Array]:
    """Logits of the steps whose prior states are given.

    Args:
      canvases: [B, S, H, W, C] canvas before each step (S = T, or 1 in decode).
      maps: [B, S, H, W, 1] location map before each step.
      steps: [S] int step indices, increasing.
      train: enables dropout (rng stream 'dropout').

    Returns:
      {'pres': [B, S], 'where': [B, S, L], 'what': [B, S, K]} float32 logits.
    """
    _check_inputs(canvases, maps, steps)
    batch, length = canvases.shape[:2]
    x = jnp.concatenate([canvases, maps], axis=-1)
    x = self.token_cnn(x.reshape(-1, *x.shape[2:])).reshape(batch, length, self.d_model)
    positions = steps.astype(jnp.int32) + 1
    x = x + self._embed_positions(positions)[None]
    if not self.decode:
      x = jnp.concatenate([self._class_embedding(batch), x], axis=1)
      positions = jnp.concatenate([jnp.zeros(1, jnp.int32), positions])
    x = self._transform(x, positions, train)
    if not self.decode:
      x = x[:, 1:]  # The class token's output predicts nothing.
    return {
      'pres': self.pres_head(x).astype(jnp.float32)[..., 0],
      'where': self.where_head(x).astype(jnp.float32),
      'what': self.what_head(x).astype(jnp.float32),
    }

  def prime(self, batch_size: int) -> None:
    """Decode mode: writes the class token's keys and values into the cache."""
    if not self.decode:
      raise ValueError('AuthorsPrior.prime fills the decode cache: clone with decode=True.')
    self._transform(self._class_embedding(batch_size), jnp.zeros(1, jnp.int32), train=False)


# --- 'ours' ------------------------------------------------------------------


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
  head_dim: int
  mlp_dim: int
  dropout: float
  decode: bool
  dtype: Any = jnp.float32
  kernels: str = 'cpu'  # Of the residual dropouts' masks: platform_kernels.FORMS.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    d_model = x.shape[-1]
    drop = functools.partial(
      dropout.Dropout, self.dropout, deterministic=not train, kernels=self.kernels
    )
    # In decode mode the cache itself masks the future.
    mask = None if self.decode else nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      qkv_features=self.num_heads * self.head_dim,
      dropout_rate=self.dropout,
      deterministic=not train,
      decode=self.decode,
      dtype=self.dtype,
    )(nn.LayerNorm(dtype=self.dtype)(x), mask=mask)
    x = x + drop()(y)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x))
    y = nn.Dense(d_model, dtype=self.dtype)(nn.gelu(y))
    return x + drop()(y)


class OursPrior(nn.Module):
  """This project's causal Transformer over the T drawing steps.

  Attributes:
    num_steps: T.
    num_parts: K.
    num_locations: L.
    token_features: channels of the token CNN.
    d_model: Transformer width.
    num_layers: Transformer blocks.
    num_heads: attention heads.
    head_dim: width of one head.
    mlp_dim: hidden width of each block's MLP.
    dropout: dropout rate (attention, residuals).
    decode: one token per call with a key/value cache.
    dtype: compute dtype (parameters stay float32; the logits are float32).
    history: which steps' boxes the location maps it reads hold
      (canvas.PRIOR_HISTORIES); whoever renders its input reads it here.
    kernels: the form of its dropout masks (platform_kernels.FORMS); its
      attention and GELU are flax's in either.
  """

  num_steps: int
  num_parts: int
  num_locations: int
  token_features: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float
  decode: bool = False
  dtype: Any = jnp.float32
  history: str = 'drawn'
  kernels: str = 'cpu'

  @nn.compact
  def __call__(
    self, canvases: jax.Array, maps: jax.Array, steps: jax.Array, train: bool = False
  ) -> dict[str, jax.Array]:
    """Logits of the steps whose prior states are given (see AuthorsPrior.__call__)."""
    _check_inputs(canvases, maps, steps)
    batch, length = canvases.shape[:2]
    x = jnp.concatenate([canvases, maps], axis=-1)
    x = TokenCNN(self.token_features, self.d_model, self.dtype)(x.reshape(-1, *x.shape[2:]))
    x = x.reshape(batch, length, self.d_model)
    x = x + nn.Embed(self.num_steps, self.d_model, dtype=self.dtype)(steps)[None]
    x = dropout.Dropout(self.dropout, deterministic=not train, kernels=self.kernels)(x)
    for _ in range(self.num_layers):
      x = Block(
        self.num_heads,
        self.head_dim,
        self.mlp_dim,
        self.dropout,
        self.decode,
        self.dtype,
        self.kernels,
      )(x, train)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    head = lambda size, name: nn.Dense(size, dtype=self.dtype, name=name)(x).astype(jnp.float32)
    return {
      'pres': head(1, 'pres_head')[..., 0],
      'where': head(self.num_locations, 'where_head'),
      'what': head(self.num_parts, 'what_head'),
    }


Prior: TypeAlias = AuthorsPrior | OursPrior


def make_prior(config: ml_collections.ConfigDict, num_locations: int) -> Prior:
  """The prior a configuration describes (L comes from the canvas grid)."""
  p, networks = config.prior, layers.check_networks(config.model.networks)
  head_dim = p.head_dim
  if head_dim == 0:
    if p.d_model % p.num_heads:
      raise ValueError(
        f'prior.head_dim = 0 needs prior.num_heads ({p.num_heads}) to divide '
        f'prior.d_model ({p.d_model}).'
      )
    head_dim = p.d_model // p.num_heads
  family = AuthorsPrior if networks == 'authors' else OursPrior
  return family(
    num_steps=config.model.T,
    num_parts=config.model.K,
    num_locations=num_locations,
    token_features=p.token_features,
    d_model=p.d_model,
    num_layers=p.num_layers,
    num_heads=p.num_heads,
    head_dim=head_dim,
    mlp_dim=p.mlp_dim,
    dropout=p.dropout,
    dtype=layers.compute_dtype(config.model.compute_dtype),
    history=canvas_lib.check_history(config.model.prior_history),
    kernels=platform_kernels.resolve(config.model.kernels),
  )


def initial_cache(
  model: Prior, params: Any, batch_size: int, canvas_shape: tuple[int, int, int]
) -> dict:
  """The cache of `model.clone(decode=True)` before step 0's token.

  Empty for OursPrior; AuthorsPrior's holds the class token at position 0.

  Args:
    model: the prior (its decode flag is ignored).
    params: its parameters.
    batch_size: B.
    canvas_shape: (Hc, Wc, C) of the canvas.
  """
  decoder = model.clone(decode=True)
  if isinstance(decoder, AuthorsPrior):
    _, variables = decoder.apply(
      {'params': params}, batch_size, method=AuthorsPrior.prime, mutable=['cache']
    )
    return variables['cache']
  # The cache's shapes come from a full-length call; its values start at 0.
  history = jnp.zeros((batch_size, model.num_steps, *canvas_shape))
  shapes = jax.eval_shape(
    lambda: decoder.init(jax.random.key(0), history, history[..., :1], jnp.arange(model.num_steps))[
      'cache'
    ]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
