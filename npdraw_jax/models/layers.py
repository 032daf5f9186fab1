"""Convolutional building blocks shared by the encoder and the decoder.

Every block takes a compute `dtype`: activations and matrix multiplies run in
it, parameters stay float32 and batch statistics are reduced in float32.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ('float32', 'bfloat16')


def compute_dtype(name: str) -> jnp.dtype:
  """The dtype of config.model.compute_dtype, checked."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'model.compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}.')
  return jnp.dtype(name)


def _phase(kernel: int, stride: int, phase: int) -> tuple[int, tuple[int, int]]:
  """First kernel tap and input padding of one output phase of a 'SAME' transposed conv.

  lax.conv_transpose dilates the input by the stride, pads it by `before` and
  correlates with the kernel: output o = s * i + phase reads dilated position
  o + u - before, a real input row only for taps u = first, first + s, ...,
  which read rows i + offset, i + offset + 1, ...
  """
  before = kernel - 1 if stride > kernel - 1 else math.ceil((kernel + stride - 2) / 2)
  first = (before - phase) % stride
  offset = (phase + first - before) // stride
  taps = len(range(first, kernel, stride))
  return first, (-offset, offset + taps - 1)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """lax.conv_transpose(x, kernel, (stride,) * 2, 'SAME'), as stride**2 ordinary convolutions.

  Output pixel (s * i + a, s * j + b) only sees the kernel taps of phase
  (a, b), so each phase is a stride-1 convolution with that sub-kernel and the
  phases are interleaved. XLA:CPU runs the gradient of an input-dilated
  convolution (how lax.conv_transpose is lowered) tens of times slower than
  these (benchmarks/RESULTS.md).

  Args:
    x: [B, H, W, Cin].
    kernel: [k, k, Cin, Cout] (HWIO, not flipped: flax ConvTranspose's layout).
    stride: s.

  Returns:
    [B, s * H, s * W, Cout].
  """
  k = kernel.shape[0]
  if k < stride:
    raise ValueError(f'A kernel of {k} taps leaves some output phases of stride {stride} empty.')
  rows = []
  for a in range(stride):
    first_a, pad_a = _phase(k, stride, a)
    row = []
    for b in range(stride):
      first_b, pad_b = _phase(k, stride, b)
      sub = kernel[first_a::stride, first_b::stride]
      dims = ('NHWC', 'HWIO', 'NHWC')
      row.append(
        jax.lax.conv_general_dilated(x, sub, (1, 1), (pad_a, pad_b), dimension_numbers=dims)
      )
    rows.append(jnp.stack(row, axis=3))  # [B, H, W, s (b), Cout]
  y = jnp.stack(rows, axis=2)  # [B, H, s (a), W, s (b), Cout]
  batch, height, _, width, _, features = y.shape
  return y.reshape(batch, stride * height, stride * width, features)


class ConvTranspose(nn.Module):
  """nn.ConvTranspose(features, (k, k), strides=(s, s), use_bias=False), computed by phases.

  Same parameter (name, shape, initialiser) and outputs as flax's layer; see
  conv_transpose for why.
  """

  features: int
  kernel: int
  strides: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel, self.kernel, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape, jnp.float32)
    return conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)


class ConvBN(nn.Module):
  """Convolution (or transposed convolution), batch norm, ReLU."""

  features: int
  kernel: int = 4
  strides: int = 2
  transpose: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # No bias: the batch norm right after removes it, and Adam would turn its
    # zero gradient's round-off into full-size steps.
    if self.transpose:
      x = ConvTranspose(self.features, self.kernel, self.strides, self.dtype)(x)
    else:
      kernel, strides = (self.kernel, self.kernel), (self.strides,) * 2
      x = nn.Conv(self.features, kernel, strides=strides, use_bias=False, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    return nn.relu(x)


class ResBlock(nn.Module):
  """Two 3x3 conv + batch norm layers with an identity shortcut."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    y = ConvBN(features, kernel=3, strides=1, dtype=self.dtype)(x, train)
    y = nn.Conv(features, (3, 3), use_bias=False, dtype=self.dtype)(y)
    y = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(y)
    return nn.relu(x + y)


class DownBody(nn.Module):
  """Two stride-2 ConvBN layers (features, 2 * features), then residual blocks."""

  features: int
  num_blocks: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvBN(self.features, dtype=self.dtype)(x, train)
    x = ConvBN(2 * self.features, dtype=self.dtype)(x, train)
    for _ in range(self.num_blocks):
      x = ResBlock(self.dtype)(x, train)
    return x
