"""Convolutional building blocks shared by the encoder and the decoder."""

import flax.linen as nn
import jax


class ConvBN(nn.Module):
  """Convolution (or transposed convolution), batch norm, ReLU."""

  features: int
  kernel: int = 4
  strides: int = 2
  transpose: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = nn.ConvTranspose if self.transpose else nn.Conv
    # No bias: the batch norm right after removes it, and Adam would turn its
    # zero gradient's round-off into full-size steps.
    kernel, strides = (self.kernel, self.kernel), (self.strides,) * 2
    x = conv(self.features, kernel, strides=strides, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.relu(x)


class ResBlock(nn.Module):
  """Two 3x3 conv + batch norm layers with an identity shortcut."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    y = ConvBN(features, kernel=3, strides=1)(x, train)
    y = nn.Conv(features, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train)(y)
    return nn.relu(x + y)


class DownBody(nn.Module):
  """Two stride-2 ConvBN layers (features, 2 * features), then residual blocks."""

  features: int
  num_blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvBN(self.features)(x, train)
    x = ConvBN(2 * self.features)(x, train)
    for _ in range(self.num_blocks):
      x = ResBlock()(x, train)
    return x
