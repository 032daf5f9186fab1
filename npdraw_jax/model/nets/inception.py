"""The Inception-v3 network of FID, up to its 2048-d pool features; inference only.

The FID network is the TensorFlow Inception graph of 2015-12-05 as ported by
pytorch-fid: torchvision's Inception-v3 layout (convolutions without bias, batch
norm with eps 0.001, ReLU) with three changes: the average pools inside the
A, C and first E blocks leave padding out of their averages, and the last
E block max-pools its pool branch. Module names follow torchvision's attribute
names, so a converted state_dict maps onto the variables name for name (see
npdraw_jax/convert_inception.py). Batch norm uses the stored statistics.

Input: NHWC images already resized and scaled to [-1, 1] (npdraw_jax/stages/fid.py
does that); any size from 75x75 up, FID uses 299x299.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURES = 2048
MIN_SIZE = 75


class BasicConv2d(nn.Module):
  """Convolution without bias, batch norm (stored statistics), ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    padding = [(p, p) for p in self.padding]
    x = nn.Conv(
      self.features, self.kernel, self.strides, padding=padding, use_bias=False, name='conv'
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _conv(features: int, kernel, name: str, strides: int = 1, padding=(0, 0)) -> BasicConv2d:
  """A BasicConv2d; an int kernel means square."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  return BasicConv2d(features, kernel, strides, padding, name=name)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over the unpadded neighbours, as TensorFlow pools."""
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 max pool; the padding never wins."""
  return nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))


def _max_pool_down(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pool without padding."""
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  """Mixed_5b..5d: 1x1, 5x5, double 3x3 and pool branches."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = _conv(64, 1, 'branch1x1')(x)
    b5 = _conv(48, 1, 'branch5x5_1')(x)
    b5 = _conv(64, 5, 'branch5x5_2', padding=(2, 2))(b5)
    b3 = _conv(64, 1, 'branch3x3dbl_1')(x)
    b3 = _conv(96, 3, 'branch3x3dbl_2', padding=(1, 1))(b3)
    b3 = _conv(96, 3, 'branch3x3dbl_3', padding=(1, 1))(b3)
    bp = _conv(self.pool_features, 1, 'branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: stride-2 reduction to 768 channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = _conv(384, 3, 'branch3x3', strides=2)(x)
    bd = _conv(64, 1, 'branch3x3dbl_1')(x)
    bd = _conv(96, 3, 'branch3x3dbl_2', padding=(1, 1))(bd)
    bd = _conv(96, 3, 'branch3x3dbl_3', strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches with `channels_7x7` inner channels."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of 1x7 and 7x1
    b1 = _conv(192, 1, 'branch1x1')(x)
    b7 = _conv(c7, 1, 'branch7x7_1')(x)
    b7 = _conv(c7, row[0], 'branch7x7_2', padding=row[1])(b7)
    b7 = _conv(192, col[0], 'branch7x7_3', padding=col[1])(b7)
    bd = _conv(c7, 1, 'branch7x7dbl_1')(x)
    bd = _conv(c7, col[0], 'branch7x7dbl_2', padding=col[1])(bd)
    bd = _conv(c7, row[0], 'branch7x7dbl_3', padding=row[1])(bd)
    bd = _conv(c7, col[0], 'branch7x7dbl_4', padding=col[1])(bd)
    bd = _conv(192, row[0], 'branch7x7dbl_5', padding=row[1])(bd)
    bp = _conv(192, 1, 'branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: stride-2 reduction to 1280 channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = _conv(192, 1, 'branch3x3_1')(x)
    b3 = _conv(320, 3, 'branch3x3_2', strides=2)(b3)
    b7 = _conv(192, 1, 'branch7x7x3_1')(x)
    b7 = _conv(192, (1, 7), 'branch7x7x3_2', padding=(0, 3))(b7)
    b7 = _conv(192, (7, 1), 'branch7x7x3_3', padding=(3, 0))(b7)
    b7 = _conv(192, 3, 'branch7x7x3_4', strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c: split 1x3 / 3x1 branches; `max_pool` picks the FID 7c pool branch."""

  max_pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = _conv(320, 1, 'branch1x1')(x)
    b3 = _conv(384, 1, 'branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        _conv(384, (1, 3), 'branch3x3_2a', padding=(0, 1))(b3),
        _conv(384, (3, 1), 'branch3x3_2b', padding=(1, 0))(b3),
      ],
      axis=-1,
    )
    bd = _conv(448, 1, 'branch3x3dbl_1')(x)
    bd = _conv(384, 3, 'branch3x3dbl_2', padding=(1, 1))(bd)
    bd = jnp.concatenate(
      [
        _conv(384, (1, 3), 'branch3x3dbl_3a', padding=(0, 1))(bd),
        _conv(384, (3, 1), 'branch3x3dbl_3b', padding=(1, 0))(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
    bp = _conv(192, 1, 'branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """x [N, H, W, 3] in [-1, 1] -> pool3 features [N, 2048] (global average pool)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, 3, 3)
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(
        f'Inception-v3 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape}.'
      )
    x = _conv(32, 3, 'Conv2d_1a_3x3', strides=2)(x)
    x = _conv(32, 3, 'Conv2d_2a_3x3')(x)
    x = _conv(64, 3, 'Conv2d_2b_3x3', padding=(1, 1))(x)
    x = _max_pool_down(x)
    x = _conv(80, 1, 'Conv2d_3b_1x1')(x)
    x = _conv(192, 3, 'Conv2d_4a_3x3')(x)
    x = _max_pool_down(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, channels_7x7 in (
      ('Mixed_6b', 128),
      ('Mixed_6c', 160),
      ('Mixed_6d', 160),
      ('Mixed_6e', 192),
    ):
      x = InceptionC(channels_7x7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    features = jnp.mean(x, axis=(1, 2))
    chex.assert_shape(features, (x.shape[0], FEATURES))
    return features


def variable_shapes() -> dict:
  """{'params': ..., 'batch_stats': ...} of ShapeDtypeStructs, without computing anything."""
  x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: FIDInceptionV3().init(jax.random.key(0), x), x)
