"""Convolutional building blocks shared by the encoder and the decoder.

ConvBN, ResBlock and DownBody make this project's own nets ('ours');
TorchConvBN and AuthorsResBlock the authors' (docs/model.md, section 11), with
PyTorch's paddings and batch norm (TorchBatchNorm).

Every block takes a compute `dtype`: activations and matrix multiplies run in
it, parameters stay float32 and batch statistics are reduced in float32.
Blocks with transposed or 1x1 convolutions take the `kernels` form they are
computed in (platform_kernels.FORMS); the parameters are the same in either.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from npdraw_jax import errors
from npdraw_jax.model import platform_kernels

COMPUTE_DTYPES = ('float32', 'bfloat16')
NETWORKS = ('authors', 'ours')
BATCH_NORM_VARIANCES = ('unbiased', 'biased')


def compute_dtype(name: str) -> jnp.dtype:
  """The dtype of config.model.compute_dtype, checked."""
  if name not in COMPUTE_DTYPES:
    raise errors.ConfigError(f'model.compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}.')
  return jnp.dtype(name)


def check_networks(name: str) -> str:
  """config.model.networks, checked: 'authors' (docs/model.md, section 11) or 'ours'."""
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


class PointwiseParams(nn.Module):
  """The parameters of nn.Conv(features, (1, 1), use_bias=...) on `inputs` channels,
  made and initialised as that layer makes them, for a caller that combines
  them before use (platform_kernels.pointwise_pair). Returns (kernel [1, 1, in, out], bias, zero
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


class ConvTranspose(nn.Module):
  """nn.ConvTranspose(features, (k, k), strides=(s, s), use_bias=...) in a kernels form.

  Same parameters (names, shapes, initialisers) and outputs as flax's layer;
  see platform_kernels.conv_transpose.
  """

  features: int
  kernel: int
  strides: int
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernels: str = 'cpu'  # platform_kernels.FORMS.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel, self.kernel, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = platform_kernels.conv_transpose(x, kernel, self.strides, self.kernels)
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
  kernels: str = 'cpu'  # Of the transposed convolution: platform_kernels.FORMS.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # No bias: the batch norm right after removes it, and Adam would turn its
    # zero gradient's round-off into full-size steps.
    if self.transpose:
      x = ConvTranspose(self.features, self.kernel, self.strides, self.dtype, kernels=self.kernels)(
        x
      )
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


# --- The authors' blocks (docs/model.md, section 11), in PyTorch's conventions ---------


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
  kernels: str = 'cpu'  # Of transposed and 1x1 convolutions: platform_kernels.FORMS.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.transpose:
      if 2 * self.padding != self.kernel - self.strides:
        raise ValueError(
          f'A transposed {self.kernel}x{self.kernel} conv of stride {self.strides} needs '
          f'padding {(self.kernel - self.strides) / 2} to scale by its stride, got {self.padding}.'
        )
      x = ConvTranspose(
        self.features, self.kernel, self.strides, self.use_bias, self.dtype, self.kernels
      )(x)
    else:
      x = nn.Conv(
        self.features,
        (self.kernel, self.kernel),
        strides=(self.strides, self.strides),
        padding=((self.padding, self.padding),) * 2,
        use_bias=self.use_bias,
        dtype=self.dtype,
        conv_general_dilated=platform_kernels.conv_general_dilated(self.kernels),
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
  kernels: str = 'cpu'  # Of the 1x1 convolution: platform_kernels.FORMS.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    conv_bn = functools.partial(
      TorchConvBN,
      features,
      use_bias=False,
      batch_norm_variance=self.batch_norm_variance,
      dtype=self.dtype,
      kernels=self.kernels,
    )
    x = nn.relu(x)
    y = conv_bn(kernel=3, padding=1)(x, train)
    y = conv_bn(kernel=1, relu=False)(y, train)
    return x + y
