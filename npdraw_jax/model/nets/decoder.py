"""The decoder p(x | canvas): canvas -> likelihood parameters (docs/model.md, section 6).

Two stride-2 ConvBN layers, two residual blocks, two stride-2 transposed
ConvBN layers, one more when the image is twice the canvas (CelebA), then a
3x3 convolution to the likelihood's parameter channels. Decoder is this
project's own ('ours'), AuthorsDecoder the authors' exact network (docs/model.md,
section 11, 'authors').
"""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from npdraw_jax.model import platform_kernels
from npdraw_jax.model.nets import layers


def _check_upsample(upsample: int) -> None:
  if upsample not in (1, 2):
    raise ValueError(f'The image must be 1 or 2 times the canvas, got {upsample}.')


class Decoder(nn.Module):
  """canvas [B, Hc, Wc, C] -> parameters [B, H, W, out_channels], float32.

  Computes in `dtype` (parameters stay float32), its transposed convolutions
  in the `kernels` form (platform_kernels.FORMS).
  """

  features: int
  out_channels: int
  upsample: int = 1  # Image side / canvas side: 1 or 2.
  dtype: Any = jnp.float32
  kernels: str = 'cpu'

  @nn.compact
  def __call__(self, canvas: jax.Array, train: bool) -> jax.Array:
    chex.assert_rank(canvas, 4)
    _check_upsample(self.upsample)
    _, h, w, _ = canvas.shape
    x = layers.DownBody(self.features, dtype=self.dtype)(canvas, train)
    up = functools.partial(layers.ConvBN, transpose=True, dtype=self.dtype, kernels=self.kernels)
    x = up(2 * self.features)(x, train)
    x = up(self.features)(x, train)
    if self.upsample == 2:
      x = up(self.features)(x, train)
    # The likelihood is evaluated in float32.
    out = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(x).astype(jnp.float32)
    chex.assert_shape(out, (canvas.shape[0], h * self.upsample, w * self.upsample, None))
    return out


class AuthorsDecoder(nn.Module):
  """The authors' decoder (docs/model.md, section 11): [B, Hc, Wc, C] -> [B, H, W, out_channels].

  Two conv4x4 stride 2 + BN + ReLU, two A-Res blocks, two transposed conv4x4
  stride 2 + BN + ReLU; when the image is twice the canvas, a transposed
  conv2x2 stride 2 + BN + ReLU and a conv1x1 (no activation); then a conv1x1
  to the likelihood's channels. Computes in `dtype` (parameters stay
  float32); the output is float32. Batch norms keep the running variance
  `batch_norm_variance` of layers.TorchBatchNorm. Transposed and 1x1
  convolutions run in the `kernels` form (platform_kernels.FORMS).
  """

  features: int
  out_channels: int
  upsample: int = 1  # Image side / canvas side: 1 or 2.
  output_bias: bool = True  # The authors' mixture-of-logistics head has none.
  dtype: Any = jnp.float32
  batch_norm_variance: str = 'unbiased'  # PyTorch's; 'biased' is flax's.
  kernels: str = 'cpu'

  @nn.compact
  def __call__(self, canvas: jax.Array, train: bool) -> jax.Array:
    chex.assert_rank(canvas, 4)
    _check_upsample(self.upsample)
    variance = layers.check_batch_norm_variance(self.batch_norm_variance)
    f, dtype, kernels = self.features, self.dtype, self.kernels
    conv_bn = functools.partial(
      layers.TorchConvBN, dtype=dtype, batch_norm_variance=variance, kernels=kernels
    )
    x = canvas
    for _ in range(2):
      x = conv_bn(f, kernel=4, strides=2, padding=1, use_bias=False)(x, train)
    for _ in range(2):
      x = layers.AuthorsResBlock(dtype, variance, kernels)(x, train)
    for _ in range(2):
      x = conv_bn(f, kernel=4, strides=2, padding=1, use_bias=False, transpose=True)(x, train)
    if self.upsample == 2:
      x = conv_bn(f, kernel=2, strides=2, transpose=True)(x, train)
      # The authors' conv1x1 (f -> f) and output conv1x1, with nn.Conv's names.
      first = layers.PointwiseParams(f, f, name='Conv_0')()
      second = layers.PointwiseParams(f, self.out_channels, self.output_bias, name='Conv_1')()
      out = platform_kernels.pointwise_pair(x, first, second, dtype, kernels)
    else:
      out = nn.Conv(
        self.out_channels,
        (1, 1),
        use_bias=self.output_bias,
        dtype=dtype,
        conv_general_dilated=platform_kernels.conv_general_dilated(kernels),
      )(x)
    # The likelihood is evaluated in float32.
    out = out.astype(jnp.float32)
    batch, h, w, _ = canvas.shape
    chex.assert_shape(out, (batch, h * self.upsample, w * self.upsample, self.out_channels))
    return out
