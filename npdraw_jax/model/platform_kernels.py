"""Platform kernels: the XLA:CPU forms of a few model operations, beside their plain forms.

Each operation below comes in two forms with the same parameters, values and
gradients (to float32 round-off; exactly for the dropout masks and the last of
a running maximum):

- 'cpu': written for XLA:CPU, each measured faster there than the plain form
  (benchmarks/RESULTS.md, "Variants in the stage-2 train step");
- 'plain': the standard flax / lax operation, the one XLA's GPU and TPU
  backends are tuned for.

  operation                      'cpu' form                          'plain' form
  transposed convolution         a stride-1 conv per output phase    lax.conv_transpose
                                 (one matmul when kernel = stride),  (nn.ConvTranspose's)
                                 2x2 phases' kernel gradient as
                                 per-tap matmuls (stride1_conv)
  1x1 convolution                a [B*H*W, C] x [C, O] matmul        lax.conv_general_dilated
  two 1x1 convolutions in turn   one, of kernel W0 W1                two
  dropout mask                   threefry as fused uint32 arithmetic jax.random.bernoulli
  last of a running maximum      the prefix scan's pairings for the  lax.cummax, last index
                                 last element only
  causal attention (no cache)    heads folded into Wq Wk^T, Wv Wo    heads as written
  exact GELU                     erf                                 jax.nn.gelu (erfc)

config.model.kernels picks the form of all of them at once ('auto': 'cpu' on
a CPU backend, 'plain' on GPUs and TPUs); `resolve` turns it into a form when
the model is built, and the modules and renderer take that form as a static
argument. Only jax here, so that canvas.py and the models can both import it.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npdraw_jax import errors

KERNELS = ('auto', 'cpu', 'plain')
FORMS = ('cpu', 'plain')


def resolve(kernels: str) -> str:
  """config.model.kernels as the form to build, 'cpu' or 'plain'; 'auto' by the default backend."""
  if kernels not in KERNELS:
    raise errors.ConfigError(f'model.kernels must be one of {KERNELS}, got {kernels!r}.')
  if kernels == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'plain'
  return kernels


def _is_cpu(form: str) -> bool:
  if form not in FORMS:
    raise ValueError(f'A kernel form is one of {FORMS} (see resolve), got {form!r}.')
  return form == 'cpu'


# --- Convolutions --------------------------------------------------------------

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


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
  padded = lax.pad(x, jnp.zeros((), x.dtype), pads)
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


def matmul_conv_general_dilated(
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
  """lax.conv_general_dilated as flax's nn.Conv calls it, 1x1 convolutions as matmuls."""
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  pointwise = (
    rhs.shape[:2] == (1, 1)
    and tuple(window_strides) == (1, 1)
    and _is_zero_padding(padding)
    and lhs_dilation in (None, (1, 1))
    and rhs_dilation in (None, (1, 1))
    and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    and feature_group_count == 1
    and precision is None
  )
  if not pointwise:
    return lax.conv_general_dilated(
      *args, feature_group_count=feature_group_count, precision=precision
    )
  return pointwise_conv(lhs, rhs)


def conv_general_dilated(form: str) -> Callable:
  """The convolution to give nn.Conv(..., conv_general_dilated=...) in a form.

  The layer's parameters are nn.Conv's either way.
  """
  return matmul_conv_general_dilated if _is_cpu(form) else lax.conv_general_dilated


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


def phase_conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """conv_transpose's 'cpu' form: stride**2 ordinary convolutions, one per output phase.

  Output pixel (s * i + a, s * j + b) only sees the kernel taps of phase
  (a, b), so each phase is a stride-1 convolution with that sub-kernel and the
  phases are interleaved (phase_convolutions); when kernel == stride every
  phase is 1x1 and all of them are one matmul (pointwise_phases). XLA:CPU
  runs the gradient of an input-dilated convolution (how lax.conv_transpose is
  lowered) tens of times slower than these (benchmarks/RESULTS.md).
  """
  k = kernel.shape[0]
  if k < stride:
    raise ValueError(f'A kernel of {k} taps leaves some output phases of stride {stride} empty.')
  if k == stride:
    return pointwise_phases(x, kernel, stride)
  return phase_convolutions(x, kernel, stride)


def phase_convolutions(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A transposed convolution as one stride-1 convolution per output phase, interleaved."""
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


def pointwise_phases(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A transposed convolution whose kernel equals its stride: each output phase is a
  1x1 convolution (tap s - 1 - a of phase a), so all phases are one
  [B*H*W, Cin] x [Cin, s*s*Cout] matmul whose columns are then interleaved."""
  phases = kernel[::-1, ::-1].transpose(2, 0, 1, 3)  # [Cin, s (a), s (b), Cout]
  batch, height, width, features = x.shape
  y = jnp.dot(x.reshape(-1, features), phases.reshape(features, -1))
  y = y.reshape(batch, height, width, stride, stride, -1).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(batch, stride * height, stride * width, -1)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int, form: str) -> jax.Array:
  """nn.ConvTranspose's computation: lax.conv_transpose(x, kernel, (s, s), 'SAME'), in a form.

  Args:
    x: [B, H, W, Cin].
    kernel: [k, k, Cin, Cout] (HWIO, not flipped: flax ConvTranspose's layout).
    stride: s.
    form: 'cpu' (phase_conv_transpose; needs k >= s) or 'plain'.

  Returns:
    [B, s * H, s * W, Cout].
  """
  if _is_cpu(form):
    return phase_conv_transpose(x, kernel, stride)
  return lax.conv_transpose(x, kernel, (stride, stride), 'SAME', dimension_numbers=_NHWC)


def pointwise_pair(x: jax.Array, first: tuple, second: tuple, dtype, form: str) -> jax.Array:
  """Two 1x1 convolutions in turn, nothing between, as nn.Conv computes them.

  The 'cpu' form is one convolution of kernel W0 W1 and bias b0 W1 + b1: equal
  in exact arithmetic. At CelebA's 64x64 output with 128 hidden channels the
  first convolution's product and its input gradient cost more than the rest
  of the decoder's last stage on XLA:CPU (benchmarks/RESULTS.md, "two 1x1
  convolutions as one").

  Args:
    x: [B, H, W, C].
    first, second: (kernel [1, 1, in, out], bias [out]) of each.
    dtype: compute dtype.
    form: 'cpu' or 'plain'.
  """
  if not _is_cpu(form):
    for kernel, bias in (first, second):
      x = _lax_conv(x.astype(dtype), kernel.astype(dtype), 'VALID') + bias.astype(dtype)
    return x
  (first_kernel, first_bias), (second_kernel, second_bias) = first, second
  kernel = first_kernel[0, 0] @ second_kernel[0, 0]
  bias = first_bias @ second_kernel[0, 0] + second_bias
  y = pointwise_conv(x.astype(dtype), kernel[None, None].astype(dtype))
  return y + bias.astype(dtype)


# --- Dropout masks ---------------------------------------------------------------

# Rotation distances of threefry-2x32's eight rounds, used alternately in groups of four.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_SCHEDULE_PARITY = np.uint32(0x1BD11BDA)
# float32's 1.0: the random mantissa bits are placed under it, as jax.random.uniform does.
_ONE_BITS = np.uint32(0x3F800000)
_MANTISSA_BITS = 23


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
  return (x << np.uint32(distance)) | (x >> np.uint32(32 - distance))


def threefry2x32(key: tuple[jax.Array, jax.Array], counts: tuple[jax.Array, jax.Array]):
  """The threefry-2x32 block function (20 rounds, Salmon et al. 2011) of a key pair over
  two uint32 count arrays, as plain uint32 arithmetic."""
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


def dropout_keep_mask(key: jax.Array, keep_prob: float, shape: tuple, form: str) -> jax.Array:
  """Which elements dropout keeps: jax.random.bernoulli(key, keep_prob, shape), nn.Dropout's draw.

  jax lowers the threefry hash behind it to a rolled 5-step loop on CPU, each
  step its own pass over the mask's memory: in the prior's stage-2 pass about
  a third of the prior's time (benchmarks/RESULTS.md). The 'cpu' form
  computes the same hash as arithmetic on iota counters (uniform), which XLA
  fuses into one loop: bit-equal masks for jax's default keys (threefry,
  partitionable counters); other keys take bernoulli's own draw.
  """
  if _is_cpu(form) and fused_bits_supported(key, shape):
    return uniform(key, shape) < np.float32(keep_prob)
  return jax.random.bernoulli(key, keep_prob, shape)


# --- The last of a running maximum -------------------------------------------------


def pairwise_last_of_cummax(x: jax.Array, axis: int) -> jax.Array:
  """lax.cummax(x, axis) at the last index, from that scan's pairings for the last element.

  jax differentiates cummax as a parallel prefix scan of pairwise maxima;
  this runs the pairings that reach the last element only, so values and
  gradients are bit-equal to cummax's, ties included (a tie splits the
  gradient in halves at each pairing). CelebA's rendering (T = 64) on XLA:CPU
  takes half the time it takes with the whole scan (benchmarks/RESULTS.md).
  """
  n = x.shape[axis]
  if n < 2:
    return lax.index_in_dim(x, n - 1, axis, keepdims=False)
  pairs = lax.max(
    lax.slice_in_dim(x, 0, n - 1, stride=2, axis=axis),
    lax.slice_in_dim(x, 1, None, stride=2, axis=axis),
  )
  last = pairwise_last_of_cummax(pairs, axis)
  if n % 2:
    last = lax.max(last, lax.index_in_dim(x, n - 1, axis, keepdims=False))
  return last


def last_of_cummax(x: jax.Array, axis: int, form: str) -> jax.Array:
  """lax.cummax(x, axis) at the last index along `axis`, in a form; bit-equal between forms."""
  if _is_cpu(form):
    return pairwise_last_of_cummax(x, axis)
  return lax.index_in_dim(lax.cummax(x, axis), x.shape[axis] - 1, axis, keepdims=False)


# --- Attention ---------------------------------------------------------------------


def folds_heads(width: int, head_dim: int, form: str) -> bool:
  """Whether attention without a cache runs on the per-head products Wq Wk^T and Wv Wo.

  Exact algebra: q.k = x (Wq Wk^T) x' and sum_h w_h v_h Wo_h = sum_h w_h x (Wv Wo)_h.
  It replaces the four projections to head_dim by two to the input width, so
  it saves multiply-adds when width < 2 head_dim: with the authors' 16 heads
  of 64 in width 64 the prior's FLOPs drop by 28% and the MNIST stage-2 step
  runs 1.12x faster on XLA:CPU (benchmarks/RESULTS.md). The 'cpu' form only.
  """
  return _is_cpu(form) and width < 2 * head_dim


def folded_attention(
  x: jax.Array,
  w_query: jax.Array,
  w_key: jax.Array,
  w_value: jax.Array,
  w_out: jax.Array,
  attention_weights: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Multi-head attention of x on itself through the per-head products (folds_heads).

  Args:
    x: [B, S, D] inputs, in the compute dtype.
    w_query, w_key, w_value: [D, H, J] projections to H heads of J.
    w_out: [H, J, D] projection back.
    attention_weights: float32 logits [B, Q, H, K] (already scaled by J^-1/2) -> masked
      softmax weights in x's dtype.

  Returns:
    [B, S, D], without the output bias.
  """
  dtype = x.dtype
  scale = w_query.shape[-1] ** -0.5
  w_query_key = jnp.einsum('dhj,ehj->dhe', w_query, w_key * scale).astype(dtype)
  w_value_out = jnp.einsum('ehj,hjf->hef', w_value, w_out).astype(dtype)
  # (query, head) stay together as rows and every product contracts trailing
  # axes, so XLA:CPU runs each as one matmul without transposes; mixing x
  # before projecting costs what projecting first does.
  query = jnp.einsum('bqd,dhe->bqhe', x, w_query_key)
  weights = attention_weights(jnp.einsum('bqhe,bke->bqhk', query, x).astype(jnp.float32))
  mixed = jnp.einsum('bqhk,bke->bqhe', weights, x)
  return jnp.einsum('bqhe,hef->bqf', mixed, w_value_out)


# --- GELU ----------------------------------------------------------------------------


def exact_gelu(x: jax.Array, form: str) -> jax.Array:
  """PyTorch's exact GELU, 0.5 x (1 + erf(x / sqrt 2)), in a form.

  The 'plain' form is jax.nn.gelu(x, approximate=False), which computes it
  through erfc; that makes the prior's forward and backward on XLA:CPU 1.08x
  slower (benchmarks/RESULTS.md).
  """
  if _is_cpu(form):
    return 0.5 * x * (1 + lax.erf(x * 2**-0.5))
  return jax.nn.gelu(x, approximate=False)
