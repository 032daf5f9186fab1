"""The posterior q(z | x): per-step logits of pres, where and what (docs/model.md, section 5).

A CNN body (stride-2 convolutions, batch norm, ReLU, residual blocks) and one
of two heads predicting all T steps at once:
- 'mlp': the flattened feature map -> dense -> T * (1 + L + K) logits.
- 'fcn': the feature map resized to sqrt(T) x sqrt(T), a 1x1 convolution per
  cell; step t is cell t in raster order (T must be a square).

Two families: Encoder is this project's own ('ours'), AuthorsEncoder the
authors' exact network (docs/model.md, section 11, 'authors').
"""

import functools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from npdraw_jax import errors
from npdraw_jax.model.nets import layers

HEADS = ('mlp', 'fcn')


def _check_head(head: str, num_steps: int) -> None:
  if head not in HEADS:
    raise errors.ConfigError(f'model.encoder_head must be one of {HEADS}, got {head!r}.')
  if head == 'fcn' and math.isqrt(num_steps) ** 2 != num_steps:
    raise errors.ConfigError(f"The 'fcn' head needs a square number of steps, got T = {num_steps}.")


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
    _check_head(self.head, self.num_steps)

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


def resize_to_grid(x: jax.Array, side: int) -> jax.Array:
  """[B, H, W, C] -> [B, side, side, C], PyTorch's bilinear interpolate (align_corners=False).

  Half-pixel centres, edges clamped, and no antialiasing when shrinking: each
  output pixel mixes at most the 2 x 2 input pixels around its centre.
  """
  chex.assert_rank(x, 4)
  shape = (x.shape[0], side, side, x.shape[-1])
  return jax.image.resize(x, shape, 'bilinear', antialias=False)


class AuthorsEncoder(nn.Module):
  """The authors' encoder (docs/model.md, section 11): x [B, H, W, C] -> Encoder's logits, float32.

  'mlp' (their MNIST/Omniglot net): 4 x [conv3x3 stride 2 + BN + ReLU],
  flatten, dense + ReLU, then three heads: what and where each dense + ReLU +
  dense, pres one dense. 'fcn' (their CIFAR-10/CelebA net): conv3x3 stride 2,
  two conv4x4 stride 2 (the last without ReLU), two A-Res blocks, conv1x1;
  resized to sqrt(T) x sqrt(T), conv1x1 + BN + ReLU and a conv1x1 per output.
  Computes in `dtype` (parameters stay float32). Batch norms keep the running
  variance `batch_norm_variance` of layers.TorchBatchNorm. The 1x1
  convolutions with batch norm (in the A-Res blocks and the 'fcn' head) run in
  the `kernels` form (platform_kernels.FORMS).
  """

  num_steps: int
  num_locations: int
  num_parts: int
  features: int
  head: str
  dtype: Any = jnp.float32
  batch_norm_variance: str = 'unbiased'  # PyTorch's; 'biased' is flax's.
  kernels: str = 'cpu'

  def setup(self):
    _check_head(self.head, self.num_steps)
    layers.check_batch_norm_variance(self.batch_norm_variance)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    chex.assert_rank(x, 4)
    batch = x.shape[0]
    steps, f, dtype = self.num_steps, self.features, self.dtype
    sizes = {'pres': 1, 'where': self.num_locations, 'what': self.num_parts}
    variance = self.batch_norm_variance
    conv_bn = functools.partial(
      layers.TorchConvBN, dtype=dtype, batch_norm_variance=variance, kernels=self.kernels
    )
    if self.head == 'mlp':
      for _ in range(4):
        x = conv_bn(f, kernel=3, strides=2, padding=1)(x, train)
      h = nn.relu(nn.Dense(f, dtype=dtype)(x.reshape(batch, -1)))
      logits = {}
      for name in ('what', 'where'):
        hidden = nn.relu(nn.Dense(f, dtype=dtype, name=f'{name}_hidden')(h))
        logits[name] = nn.Dense(steps * sizes[name], dtype=dtype, name=name)(hidden)
      logits['pres'] = nn.Dense(steps, dtype=dtype, name='pres')(h)
    else:
      x = conv_bn(f, kernel=3, strides=2, padding=1)(x, train)
      x = conv_bn(f, kernel=4, strides=2, padding=1, use_bias=False)(x, train)
      x = conv_bn(f, kernel=4, strides=2, padding=1, use_bias=False, relu=False)(x, train)
      for _ in range(2):
        x = layers.AuthorsResBlock(dtype, variance, self.kernels)(x, train)
      x = nn.Conv(f, (1, 1), dtype=dtype)(x)
      x = resize_to_grid(x, math.isqrt(steps))
      h = conv_bn(f, kernel=1)(x, train)
      logits = {
        name: nn.Conv(size, (1, 1), dtype=dtype, name=name)(h) for name, size in sizes.items()
      }
    # Step t is cell t in raster order; latents and losses use float32 logits.
    out = {
      name: logits[name].reshape(batch, steps, sizes[name]).astype(jnp.float32)
      for name in ('pres', 'where', 'what')
    }
    out['pres'] = out['pres'][..., 0]
    return out
