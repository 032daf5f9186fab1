"""Convolutional building blocks shared by the encoder and the decoder.

ConvBN, ResBlock and DownBody make this project's own nets ('ours');
TorchConvBN and AuthorsResBlock the authors' (spec section 11), with
PyTorch's paddings and batch norm (TorchBatchNorm).

Every block takes a compute `dtype`: activations and matrix multiplies run in
it, parameters stay float32 and batch statistics are reduced in float32.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from npdraw_jax import errors

COMPUTE_DTYPES = ('float32', 'bfloat16')
NETWORKS = ('authors', 'ours')
BATCH_NORM_VARIANCES = ('unbiased', 'biased')


def compute_dtype(name: str) -> jnp.dtype:
  """The dtype of config.model.compute_dtype, checked."""
  if name not in COMPUTE_DTYPES:
    raise errors.ConfigError(f'model.compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}.')
  return jnp.dtype(name)


def check_networks(name: str) -> str:
  """config.model.networks, checked: 'authors' (spec section 11) or 'ours'."""
  if name not in NETWORKS:
    raise errors.ConfigError(f'model.networks must be one of {NETWORKS}, got {name!r}.')
  return name


def check_batch_norm_variance(name: str) -> str:
  """config.model.batch_norm_variance, checked: 'unbiased' (PyTorch's) or 'biased' (flax's)."""
  if name not in BATCH_NORM_VARIANCES:
    raise errors.ConfigError(
      f'model.batch_norm_variance must be one of {BATCH_NORM_VARIANCES}, got {name!r}.'
    )
  return name


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


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def stride1_conv(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
  """A stride-1 NHWC/HWIO convolution with explicit (maybe negative) padding pairs.

  Same values and gradients as lax's; the kernel gradient is one matmul per
  tap, summed over a few batch chunks. XLA:CPU runs the kernel gradient of
  the 2x2 phases of conv_transpose as one long-contraction product, about 3x
  slower (benchmarks/RESULTS.md, "The stage-2 step at the authors'
  networks"); for 3x3 kernels its own is faster, and 1x1 kernels are plain
  matmuls (pointwise_conv), so use this for the 2x2 phases only.
  """
  return _lax_conv(x, kernel, padding)


def _stride1_conv_fwd(x, kernel, padding):
  return _lax_conv(x, kernel, padding), (x, kernel)


def _stride1_conv_bwd(padding, residuals, g):
  x, kernel = residuals
  (d_x,) = jax.vjp(lambda x: _lax_conv(x, kernel, padding), x)[1](g)
  rows, cols = kernel.shape[:2]
  batch, height, width, features = g.shape
  pads = [(0, 0, 0), *((low, high, 0) for low, high in padding), (0, 0, 0)]
  padded = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
  chunks = math.gcd(batch, 4)  # A batch axis the matmul splits over the cores.
  g = g.reshape(chunks, -1, features)
  taps = []
  for u in range(rows):
    for v in range(cols):
      tap = padded[:, u : u + height, v : v + width].reshape(chunks, -1, x.shape[-1])
      taps.append(jnp.einsum('nkc,nko->nco', tap, g).sum(axis=0))
  return d_x, jnp.stack(taps).reshape(kernel.shape)


stride1_conv.defvjp(_stride1_conv_fwd, _stride1_conv_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 stride-1 unpadded NHWC/HWIO convolution as one [B*H*W, C] x [C, O] matmul.

  XLA:CPU runs 1x1 convolutions and their gradients 2-3x slower than this
  matmul (benchmarks/RESULTS.md, "1x1 convolutions as matmuls").
  """
  batch, height, width, features = x.shape
  y = jnp.dot(x.reshape(-1, features), kernel.reshape(features, -1))
  return y.reshape(batch, height, width, -1)


def _is_zero_padding(padding) -> bool:
  return padding in ('SAME', 'VALID') or all(tuple(pair) == (0, 0) for pair in padding)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """lax.conv_general_dilated as flax's nn.Conv calls it; 1x1 convolutions as matmuls.

  Pass it as nn.Conv(..., conv_general_dilated=conv_general_dilated): the
  parameters and values are nn.Conv's.
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  pointwise = (
    rhs.shape[:2] == (1, 1)
    and tuple(window_strides) == (1, 1)
    and _is_zero_padding(padding)
    and lhs_dilation in (None, (1, 1))
    and rhs_dilation in (None, (1, 1))
    and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    and feature_group_count == 1
    and precision is None
  )
  if not pointwise:
    return jax.lax.conv_general_dilated(
      *args, feature_group_count=feature_group_count, precision=precision
    )
  return pointwise_conv(lhs, rhs)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """lax.conv_transpose(x, kernel, (stride,) * 2, 'SAME'), as stride**2 ordinary convolutions.

  Output pixel (s * i + a, s * j + b) only sees the kernel taps of phase
  (a, b), so each phase is a stride-1 convolution with that sub-kernel and the
  phases are interleaved (_phase_convolutions); when kernel == stride every
  phase is 1x1 and all of them are one matmul (_pointwise_phases). XLA:CPU
  runs the gradient of an input-dilated convolution (how lax.conv_transpose is
  lowered) tens of times slower than these (benchmarks/RESULTS.md).

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
  if k == stride:
    return _pointwise_phases(x, kernel, stride)
  return _phase_convolutions(x, kernel, stride)


def _phase_convolutions(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """conv_transpose as one stride-1 convolution per output phase, interleaved."""
  k = kernel.shape[0]
  rows = []
  for a in range(stride):
    first_a, pad_a = _phase(k, stride, a)
    row = []
    for b in range(stride):
      first_b, pad_b = _phase(k, stride, b)
      sub = kernel[first_a::stride, first_b::stride]
      if sub.shape[:2] == (1, 1) and _is_zero_padding((pad_a, pad_b)):
        row.append(pointwise_conv(x, sub))  # e.g. phase (1, 1) of a 3x3 kernel of stride 2
      else:
        row.append(stride1_conv(x, sub, (pad_a, pad_b)))
    rows.append(jnp.stack(row, axis=3))  # [B, H, W, s (b), Cout]
  y = jnp.stack(rows, axis=2)  # [B, H, s (a), W, s (b), Cout]
  batch, height, _, width, _, features = y.shape
  return y.reshape(batch, stride * height, stride * width, features)


def _pointwise_phases(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """conv_transpose when kernel == stride: each output phase is a 1x1 convolution
  (tap s - 1 - a of phase a), so all phases are one [B*H*W, Cin] x [Cin, s*s*Cout]
  matmul whose columns are then interleaved."""
  phases = kernel[::-1, ::-1].transpose(2, 0, 1, 3)  # [Cin, s (a), s (b), Cout]
  batch, height, width, features = x.shape
  y = jnp.dot(x.reshape(-1, features), phases.reshape(features, -1))
  y = y.reshape(batch, height, width, stride, stride, -1).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(batch, stride * height, stride * width, -1)


class PointwiseParams(nn.Module):
  """The parameters of nn.Conv(features, (1, 1), use_bias=...) on `inputs` channels,
  made and initialised as that layer makes them, for a caller that combines
  them before use (pointwise_pair). Returns (kernel [1, 1, in, out], bias, zero
  without use_bias)."""

  inputs: int
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    shape = (1, 1, self.inputs, self.features)
    kernel = self.param('kernel', nn.linear.default_kernel_init, shape, jnp.float32)
    if not self.use_bias:
      return kernel, jnp.zeros((self.features,), jnp.float32)
    return kernel, self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)


def pointwise_pair(x: jax.Array, first: tuple, second: tuple, dtype: Any) -> jax.Array:
  """Two 1x1 convolutions in turn, nothing between, as one: kernel W0 W1, bias b0 W1 + b1.

  Equal in exact arithmetic (float tolerance in practice). At CelebA's 64x64
  output with 128 hidden channels, the first convolution's product and its
  input gradient cost more than the rest of the decoder's last stage
  (benchmarks/RESULTS.md, "two 1x1 convolutions as one").

  Args:
    x: [B, H, W, C].
    first, second: (kernel [1, 1, in, out], bias [out]) of each, as PointwiseParams gives.
    dtype: compute dtype.
  """
  (first_kernel, first_bias), (second_kernel, second_bias) = first, second
  kernel = first_kernel[0, 0] @ second_kernel[0, 0]
  bias = first_bias @ second_kernel[0, 0] + second_bias
  y = pointwise_conv(x.astype(dtype), kernel[None, None].astype(dtype))
  return y + bias.astype(dtype)


class ConvTranspose(nn.Module):
  """nn.ConvTranspose(features, (k, k), strides=(s, s), use_bias=...), computed by phases.

  Same parameters (names, shapes, initialisers) and outputs as flax's layer;
  see conv_transpose for why.
  """

  features: int
  kernel: int
  strides: int
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel, self.kernel, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape, jnp.float32)
    y = conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


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


# --- The authors' blocks (spec section 11), in PyTorch's conventions ---------


# flax's momentum: the running averages keep 0.9 of themselves (PyTorch's momentum 0.1).
_TORCH_BN_KEEP = 0.9
_TORCH_BN_EPSILON = 1e-5


class TorchBatchNorm(nn.Module):
  """PyTorch's BatchNorm2d over the last axis of [..., C]: momentum 0.1, epsilon 1e-5.

  Training normalises with the batch's mean and biased variance, computed in
  float32 over every axis but the last (of the global array under jit, so
  sharded batches reduce over the whole batch, as nn.BatchNorm does). The
  running averages then move a tenth of the way to the batch's mean and to
  its variance: 'unbiased' (PyTorch) takes the unbiased variance, n / (n - 1)
  times the biased one, n the number of values per channel; 'biased' (flax's
  nn.BatchNorm) the biased one. Evaluation normalises with the running
  averages. Variables, initial values, the variance formula (E[x^2] - E[x]^2,
  floored at 0) and the output dtype are nn.BatchNorm's, so checkpoints and
  'biased' outputs are those of nn.BatchNorm(momentum=0.9, epsilon=1e-5).
  """

  use_running_average: bool
  variance: str = 'unbiased'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_batch_norm_variance(self.variance)
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axes)
      # Round-off can make E[x^2] - E[x]^2 negative.
      var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), axes) - jnp.square(mean))
      if not self.is_initializing():
        keep = _TORCH_BN_KEEP
        running_mean.value = keep * running_mean.value + (1 - keep) * mean
        running_var.value = keep * running_var.value + (1 - keep) * self._stored(var, x)
    scale = self.param('scale', nn.initializers.ones_init(), (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (features,), jnp.float32)
    y = (x - mean) * (jax.lax.rsqrt(var + _TORCH_BN_EPSILON) * scale) + bias
    return y.astype(self.dtype)

  def _stored(self, biased_var: jax.Array, x: jax.Array) -> jax.Array:
    """The batch variance the running average takes: biased or n / (n - 1) times it."""
    if self.variance == 'biased':
      return biased_var
    count = math.prod(x.shape[:-1])
    if count < 2:
      # PyTorch refuses too: no unbiased variance from one value.
      raise ValueError(f'Training batch norm needs more than 1 value per channel, got {x.shape}.')
    return biased_var * (count / (count - 1))


class TorchConvBN(nn.Module):
  """PyTorch's Conv2d(k, stride, padding) or ConvTranspose2d, then batch norm and maybe ReLU.

  A transposed convolution must map H to strides * H (2 * padding = kernel -
  strides, as 4x4 stride 2 padding 1); it then equals a 'SAME' one whose
  kernel is PyTorch's flipped in both spatial axes. use_bias defaults to
  PyTorch's True: redundant before batch norm, but kept where the authors
  have it so the parameters match theirs.
  """

  features: int
  kernel: int
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  transpose: bool = False
  relu: bool = True
  dtype: Any = jnp.float32
  batch_norm_variance: str = 'unbiased'  # Of the running variance: TorchBatchNorm.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.transpose:
      if 2 * self.padding != self.kernel - self.strides:
        raise ValueError(
          f'A transposed {self.kernel}x{self.kernel} conv of stride {self.strides} needs '
          f'padding {(self.kernel - self.strides) / 2} to scale by its stride, got {self.padding}.'
        )
      x = ConvTranspose(self.features, self.kernel, self.strides, self.use_bias, self.dtype)(x)
    else:
      x = nn.Conv(
        self.features,
        (self.kernel, self.kernel),
        strides=(self.strides, self.strides),
        padding=((self.padding, self.padding),) * 2,
        use_bias=self.use_bias,
        dtype=self.dtype,
        conv_general_dilated=conv_general_dilated,
      )(x)
    # nn.BatchNorm's name here, which checkpoints written before TorchBatchNorm carry.
    norm = TorchBatchNorm(not train, self.batch_norm_variance, self.dtype, name='BatchNorm_0')
    x = norm(x)
    return nn.relu(x) if self.relu else x


class AuthorsResBlock(nn.Module):
  """A-Res: x' = ReLU(x); x' + BN(conv1x1(ReLU(BN(conv3x3(x'))))), convs without bias.

  The input's ReLU is part of the block and there is none after the sum.
  """

  dtype: Any = jnp.float32
  batch_norm_variance: str = 'unbiased'  # Of the running variance: TorchBatchNorm.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    conv_bn = functools.partial(
      TorchConvBN,
      features,
      use_bias=False,
      batch_norm_variance=self.batch_norm_variance,
      dtype=self.dtype,
    )
    x = nn.relu(x)
    y = conv_bn(kernel=3, padding=1)(x, train)
    y = conv_bn(kernel=1, relu=False)(y, train)
    return x + y
