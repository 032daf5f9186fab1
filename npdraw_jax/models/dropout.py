"""Dropout with flax's masks, computed as one fused elementwise hash.

flax's nn.Dropout draws its mask with jax.random.bernoulli, whose threefry
hash jax lowers to a rolled 5-step loop on CPU: every step is its own pass over
the mask's memory. In the prior's stage-2 pass that was about a third of the
prior's time (benchmarks/RESULTS.md). Here the same hash (threefry-2x32, 20
rounds, Salmon et al. 2011) is written as plain uint32 arithmetic on iota
counters, which XLA fuses into one loop on every backend. For jax's default
keys (threefry, partitionable counters) the masks are bit-equal to nn.Dropout's
under the same rng, so models and checkpoints are unchanged; any other key
implementation falls back to nn.Dropout's own draw.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Rotation distances of threefry-2x32's eight rounds, used alternately in groups of four.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_SCHEDULE_PARITY = np.uint32(0x1BD11BDA)
# float32's 1.0: the random mantissa bits are placed under it, as jax.random.uniform does.
_ONE_BITS = np.uint32(0x3F800000)
_MANTISSA_BITS = 23


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
  return (x << np.uint32(distance)) | (x >> np.uint32(32 - distance))


def threefry2x32(key: tuple[jax.Array, jax.Array], counts: tuple[jax.Array, jax.Array]):
  """The threefry-2x32 block function (20 rounds) of a key pair over two uint32 count arrays."""
  schedule = (key[0], key[1], key[0] ^ key[1] ^ _KEY_SCHEDULE_PARITY)
  x0, x1 = counts[0] + schedule[0], counts[1] + schedule[1]
  for group in range(5):
    for distance in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, distance) ^ x0
    x0 = x0 + schedule[(group + 1) % 3]
    x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major position of every element, as uint32; a sum of per-axis iotas,
  which XLA's SPMD partitioner splits like the array itself."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return index


def fused_bits_supported(key: jax.Array, shape: tuple[int, ...]) -> bool:
  """Whether random_bits reproduces jax.random.bits for this key and shape."""
  return (
    jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    and str(jax.random.key_impl(key)) == 'threefry2x32'
    # A jax without the flag may count differently: leave the draw to jax there.
    and getattr(jax.config, 'jax_threefry_partitionable', False)
    and 0 < math.prod(shape) < 2**32
  )


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """jax.random.bits(key, shape) for a partitionable threefry key, as fused arithmetic.

  Each element hashes its 64-bit row-major position (high word 0 below 2^32
  elements) and keeps the xor of the two output words, as jax does.
  """
  if not fused_bits_supported(key, shape):
    raise ValueError(f'random_bits needs a threefry key and 0 < size < 2^32; got {key!r}, {shape}.')
  words = jax.random.key_data(key)
  high, low = threefry2x32((words[0], words[1]), (jnp.zeros(shape, jnp.uint32), _flat_index(shape)))
  return high ^ low


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """jax.random.uniform(key, shape) in float32 ([0, 1)), from random_bits."""
  mantissa = random_bits(key, shape) >> np.uint32(32 - _MANTISSA_BITS)
  return lax.bitcast_convert_type(mantissa | _ONE_BITS, jnp.float32) - np.float32(1)


class Dropout(nn.Module):
  """nn.Dropout(rate) without broadcast dimensions: the same mask for the same rng.

  Named like flax's layer so that an auto-named instance (Dropout_0, ...) draws
  the rng that nn.Dropout drew in its place.
  """

  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    rng = self.make_rng('dropout')
    if not fused_bits_supported(rng, inputs.shape):
      return nn.Dropout(self.rate, deterministic=False, name='fallback')(inputs, rng=rng)
    keep_prob = 1.0 - self.rate
    keep = uniform(rng, inputs.shape) < np.float32(keep_prob)
    return lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))
