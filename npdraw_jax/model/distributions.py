"""Pixel likelihoods of the decoder and the discrete distributions of the latents.

Pixel likelihoods (docs/model.md, section 6) take the decoder's output `params`
[B, H, W, P] and images `x` [B, H, W, C] in [0, 1] and return the negative
log-likelihood of each image in nats, [B]:

- `bernoulli`: P = C logits; x in {0, 1}.
- `logistic`: P = 2C; `params[..., :C]` are the means, `params[..., C:]` the
  log-scales of one discretised logistic per sub-pixel.
- `mixture_logistic`: the PixelCNN++ layout. `params[..., :M]` are the mixture
  logits; the rest, read as [..., C, 3, M] (C = 3) or [..., C, 2, M] (C = 1),
  holds per channel c: means `[..., c, 0, :]`, log-scales `[..., c, 1, :]` and,
  for colour, the raw coupling coefficient `[..., c, 2, :]` (through tanh).
  Coefficient c0 (slot of channel 0) couples x0 into channel 1; c1 and c2
  (slots of channels 1 and 2) couple x0 and x1 into channel 2.

8-bit data arrive as x = k / 255. The logistic likelihoods work on the
[-1, 1] scale: k maps to the bin centre y = 2k/255 - 1, bins are 2/255 wide,
and the bins k = 0 and k = 255 extend to -inf and +inf, so the 256
probabilities of a sub-pixel sum to one. A network output of zero is thus a
mid-grey mean with a scale of half the range. Log-scales are floored at
`MIN_LOG_SCALE` (as PixelCNN++ does) so that one bin cannot take all the mass
of an infinitely sharp logistic; `nll`, `mean_image` and `sample_image` all
use the floored value.

Bin masses are computed in log space from the exact identity
  sigmoid(b) - sigmoid(a) = sigmoid(b) * sigmoid(-a) * (1 - exp(-(b - a))),
so no difference of nearly equal CDFs is ever formed and the mass cannot
underflow to zero, however far the bin lies in a tail. Only when a bin is
tiny against the scale (b - a < 1e-6) does 1 - exp(-d) fall back to d, its
first-order value, computed from the log-scale so that it never underflows.

Conventions (config.model.likelihood_convention, LIKELIHOOD_CONVENTIONS). The
authors' decoder outputs means and log-scales on the [0, 1] scale, and they
train on a loss of their own ('authors'): `from_unit_scale` rewrites their
outputs exactly as the parameters above, and `authors_nll` computes their
training loss from those parameters. 'tiling' reads the decoder's outputs as
the parameters above directly and trains on `nll`.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from npdraw_jax import errors

LIKELIHOODS = ('bernoulli', 'logistic', 'mixture_logistic')
LIKELIHOOD_CONVENTIONS = ('authors', 'tiling')
MIN_LOG_SCALE = -7.0
NUM_BINS = 256
# Half the width of a bin on the [-1, 1] scale.
_HALF_BIN = 1.0 / (NUM_BINS - 1)
# The mixture couples colour channels (coefficients x0 -> 1, x0 -> 2, x1 -> 2).
_COUPLED_CHANNELS = 3
_MIXTURE_CHANNELS = (1, _COUPLED_CHANNELS)


def _check_name(likelihood: str) -> None:
  if likelihood not in LIKELIHOODS:
    raise ValueError(f'Unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}.')


def check_likelihood_convention(name: str) -> str:
  """config.model.likelihood_convention, checked: 'authors' or 'tiling' (module doc)."""
  if name not in LIKELIHOOD_CONVENTIONS:
    raise errors.ConfigError(
      f'model.likelihood_convention must be one of {LIKELIHOOD_CONVENTIONS}, got {name!r}.'
    )
  return name


def num_outputs(likelihood: str, channels: int, num_mixtures: int) -> int:
  """Channels of the decoder's output head for `likelihood` on C-channel images."""
  _check_name(likelihood)
  if channels < 1:
    raise ValueError(f'channels must be positive, got {channels}.')
  if likelihood == 'bernoulli':
    return channels
  if likelihood == 'logistic':
    return 2 * channels
  if channels not in _MIXTURE_CHANNELS:
    raise ValueError(f'mixture_logistic supports channels in {_MIXTURE_CHANNELS}, got {channels}.')
  if num_mixtures < 1:
    raise ValueError(f'num_mixtures must be positive, got {num_mixtures}.')
  per_channel = 3 if channels == _COUPLED_CHANNELS else 2
  return num_mixtures + channels * per_channel * num_mixtures


# --- Bernoulli pixels --------------------------------------------------------------


def bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
  """-log p(x) of binary images: logits, x [B, H, W, C] -> [B] nats."""
  chex.assert_rank(logits, 4)
  chex.assert_equal_shape([logits, x])
  logits = jnp.asarray(logits, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  log_p = x * jax.nn.log_sigmoid(logits) + (1.0 - x) * jax.nn.log_sigmoid(-logits)
  return -jnp.sum(log_p, axis=(1, 2, 3))


# --- Discretised logistic ----------------------------------------------------------


def _bin_index(x: jax.Array) -> jax.Array:
  """Images in [0, 1] -> int32 bin k in 0..255 (rounding absorbs k/255 float error)."""
  return jnp.clip(jnp.round(x * (NUM_BINS - 1)), 0, NUM_BINS - 1).astype(jnp.int32)


def _centre(k: jax.Array) -> jax.Array:
  """Bin k -> its centre on the [-1, 1] scale."""
  return k.astype(jnp.float32) * (2.0 / (NUM_BINS - 1)) - 1.0


def _log1mexp(d: jax.Array, log_d: jax.Array) -> jax.Array:
  """log(1 - exp(-d)) for d > 0, given log d as well (used when d underflows)."""
  tiny = 1e-6
  # Each branch sees only inputs where it is finite, so that the branch not
  # taken by `where` cannot put a NaN into the gradient.
  small = jnp.log(-jnp.expm1(-jnp.maximum(d, tiny)))
  large = jnp.log1p(-jnp.exp(-jnp.maximum(d, math.log(2.0))))
  # 1 - exp(-d) = d (1 - d/2 + ...), so log = log d - d/2 to O(d^2).
  first_order = log_d - 0.5 * d
  return jnp.where(d < tiny, first_order, jnp.where(d < math.log(2.0), small, large))


def _log_bin_mass(k: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
  """log P(bin k) of a discretised logistic on the [-1, 1] scale, edge bins taking the tails.

  Args:
    k: int bins, broadcastable against `mean`.
    mean: logistic means.
    log_scale: raw log-scales (floored here at MIN_LOG_SCALE).

  Returns:
    log-probabilities, the broadcast shape.
  """
  log_scale = jnp.maximum(log_scale, MIN_LOG_SCALE)
  inv_scale = jnp.exp(-log_scale)
  offset = _centre(k) - mean
  upper = (offset + _HALF_BIN) * inv_scale
  lower = (offset - _HALF_BIN) * inv_scale
  # Standardised bin width, formed directly rather than as upper - lower,
  # which would cancel when the scale is large.
  width = 2.0 * _HALF_BIN * inv_scale
  log_width = math.log(2.0 * _HALF_BIN) - log_scale
  log_below_upper = jax.nn.log_sigmoid(upper)  # log F(upper)
  log_above_lower = jax.nn.log_sigmoid(-lower)  # log (1 - F(lower))
  interior = log_below_upper + log_above_lower + _log1mexp(width, log_width)
  return jnp.where(k == 0, log_below_upper, jnp.where(k == NUM_BINS - 1, log_above_lower, interior))


def logistic_nll(params: jax.Array, x: jax.Array) -> jax.Array:
  """-log p(x) under a discretised logistic per sub-pixel.

  Args:
    params: [B, H, W, 2C]: means [..., :C], log-scales [..., C:] on the [-1, 1] scale.
    x: [B, H, W, C] images, values k/255.

  Returns:
    [B] nats per image.
  """
  chex.assert_rank(x, 4)
  channels = x.shape[-1]
  chex.assert_shape(params, (*x.shape[:3], 2 * channels))
  params = jnp.asarray(params, jnp.float32)
  mean, log_scale = params[..., :channels], params[..., channels:]
  log_p = _log_bin_mass(_bin_index(x), mean, log_scale)
  return -jnp.sum(log_p, axis=(1, 2, 3))


# --- Discretised mixture of logistics ----------------------------------------------


def _mixture_fields(params: jax.Array, channels: int, num_mixtures: int):
  """params [..., P] -> logits [..., M], per-channel fields [..., C, F, M] (F = 3 or 2)."""
  chex.assert_axis_dimension(params, -1, num_outputs('mixture_logistic', channels, num_mixtures))
  params = jnp.asarray(params, jnp.float32)
  fields = 3 if channels == _COUPLED_CHANNELS else 2
  rest = params[..., num_mixtures:].reshape(*params.shape[:-1], channels, fields, num_mixtures)
  return params[..., :num_mixtures], rest


def _split_mixture(params: jax.Array, channels: int, num_mixtures: int):
  """params [..., P] -> logits [..., M], means and log-scales [..., C, M], coefficients.

  The coefficients come back through tanh as [..., 3, M] for colour, None for C = 1.
  """
  logits, rest = _mixture_fields(params, channels, num_mixtures)
  coeffs = jnp.tanh(rest[..., 2, :]) if channels == _COUPLED_CHANNELS else None
  return logits, rest[..., 0, :], rest[..., 1, :], coeffs


def _coupled_means(means: jax.Array, coeffs, y: jax.Array) -> jax.Array:
  """Means [..., C, M] after coupling on earlier channels' values y [..., C, 1 or M]."""
  if coeffs is None:
    return means
  return jnp.stack(
    [
      means[..., 0, :],
      means[..., 1, :] + coeffs[..., 0, :] * y[..., 0, :],
      means[..., 2, :] + coeffs[..., 1, :] * y[..., 0, :] + coeffs[..., 2, :] * y[..., 1, :],
    ],
    axis=-2,
  )


def mixture_logistic_nll(params: jax.Array, x: jax.Array, num_mixtures: int) -> jax.Array:
  """-log p(x) under the PixelCNN++ discretised mixture of logistics (layout: module doc).

  Args:
    params: [B, H, W, num_outputs('mixture_logistic', C, M)].
    x: [B, H, W, C] images, values k/255, C in {1, 3}.
    num_mixtures: M.

  Returns:
    [B] nats per image.
  """
  chex.assert_rank(x, 4)
  channels = x.shape[-1]
  chex.assert_shape(params, (*x.shape[:3], num_outputs('mixture_logistic', channels, num_mixtures)))
  logits, means, log_scales, coeffs = _split_mixture(params, channels, num_mixtures)
  k = _bin_index(x)[..., None]  # [B, H, W, C, 1]
  means = _coupled_means(means, coeffs, _centre(k))
  log_p_given_m = jnp.sum(_log_bin_mass(k, means, log_scales), axis=-2)  # [B, H, W, M]
  log_p = jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + log_p_given_m, axis=-1)
  return -jnp.sum(log_p, axis=(1, 2))


# --- Dispatch, pictures, samples ---------------------------------------------------


def nll(likelihood: str, params: jax.Array, x: jax.Array, num_mixtures: int) -> jax.Array:
  """-log p(x) [B] under `likelihood`; params [B, H, W, P], x [B, H, W, C] in [0, 1]."""
  _check_name(likelihood)
  if likelihood == 'bernoulli':
    return bernoulli_nll(params, x)
  if likelihood == 'logistic':
    return logistic_nll(params, x)
  return mixture_logistic_nll(params, x, num_mixtures)


def _to_unit(y: jax.Array) -> jax.Array:
  """[-1, 1] scale -> [0, 1], clipped."""
  return jnp.clip((y + 1.0) * 0.5, 0.0, 1.0)


def _image_channels(likelihood: str, params: jax.Array, num_mixtures: int) -> int:
  """C from the parameter channels P."""
  p = params.shape[-1]
  if likelihood == 'bernoulli':
    return p
  if likelihood == 'logistic':
    if p % 2:
      raise ValueError(f'logistic needs 2C parameter channels, got {p}.')
    return p // 2
  for c in _MIXTURE_CHANNELS:
    if num_outputs(likelihood, c, num_mixtures) == p:
      return c
  raise ValueError(f'{p} parameter channels fit no mixture_logistic with M = {num_mixtures}.')


def _pick(a: jax.Array, component: jax.Array) -> jax.Array:
  """a [B, H, W, R, M] at component [B, H, W] -> [B, H, W, R]."""
  return jnp.take_along_axis(a, component[..., None, None], axis=-1)[..., 0]


def mean_image(likelihood: str, params: jax.Array, num_mixtures: int) -> jax.Array:
  """A picture of p(x | params): [B, H, W, P] -> [B, H, W, C] in [0, 1].

  bernoulli: sigmoid(logits). logistic: the mean, clipped to [0, 1] (the edge
  bins make the true mean differ slightly near 0 and 1). mixture_logistic: the
  clipped mean of the most likely component, channels in order, each coupled
  on the clipped values of the channels before it. The mixture's own mean
  would blur distinct colours together; its mode would need a search.
  """
  chex.assert_rank(params, 4)
  _check_name(likelihood)
  params = jnp.asarray(params, jnp.float32)
  channels = _image_channels(likelihood, params, num_mixtures)
  if likelihood == 'bernoulli':
    return jax.nn.sigmoid(params)
  if likelihood == 'logistic':
    return _to_unit(params[..., :channels])
  logits, means, _, coeffs = _split_mixture(params, channels, num_mixtures)
  best = jnp.argmax(logits, axis=-1)
  mean = _pick(means, best)
  if coeffs is None:
    return _to_unit(mean)
  coeff = _pick(coeffs, best)
  y0 = jnp.clip(mean[..., 0], -1.0, 1.0)
  y1 = jnp.clip(mean[..., 1] + coeff[..., 0] * y0, -1.0, 1.0)
  y2 = mean[..., 2] + coeff[..., 1] * y0 + coeff[..., 2] * y1
  return _to_unit(jnp.stack([y0, y1, y2], axis=-1))


def _quantise(y: jax.Array) -> jax.Array:
  """A continuous draw on the [-1, 1] scale -> its int32 bin k (the edge bins take the tails)."""
  k = jnp.clip(jnp.round((y + 1.0) * (0.5 * (NUM_BINS - 1))), 0, NUM_BINS - 1)
  return k.astype(jnp.int32)


def _bin_value(k: jax.Array) -> jax.Array:
  """Bin k -> k/255 in float32, bit-equal to the data's `uint8 / 255.0`.

  A table, because XLA turns division by a constant into multiplication by its
  rounded reciprocal, which is off by an ulp for about half of the values.
  """
  table = np.arange(NUM_BINS, dtype=np.float32) / np.float32(NUM_BINS - 1)
  return jnp.asarray(table)[k]


def sample_image(
  likelihood: str, key: jax.Array, params: jax.Array, num_mixtures: int
) -> jax.Array:
  """An exact draw x ~ p(x | params): [B, H, W, P] -> [B, H, W, C] in [0, 1].

  bernoulli: 0/1. logistic: a continuous logistic draw rounded to the nearest
  bin centre and clipped, which is exactly the discretised distribution.
  mixture_logistic: a component, then the channels in order, each coupled on
  the quantised values already drawn (those are what the likelihood
  conditions on). Values are k/255.
  """
  chex.assert_rank(params, 4)
  _check_name(likelihood)
  params = jnp.asarray(params, jnp.float32)
  channels = _image_channels(likelihood, params, num_mixtures)
  if likelihood == 'bernoulli':
    return jax.random.bernoulli(key, jax.nn.sigmoid(params)).astype(jnp.float32)
  if likelihood == 'logistic':
    mean, log_scale = params[..., :channels], params[..., channels:]
    noise = jax.random.logistic(key, mean.shape, jnp.float32)
    y = mean + jnp.exp(jnp.maximum(log_scale, MIN_LOG_SCALE)) * noise
    return _bin_value(_quantise(y))
  k_component, k_noise = jax.random.split(key)
  logits, means, log_scales, coeffs = _split_mixture(params, channels, num_mixtures)
  component = jax.random.categorical(k_component, logits, axis=-1)
  mean = _pick(means, component)
  scale = jnp.exp(jnp.maximum(_pick(log_scales, component), MIN_LOG_SCALE))
  noise = jax.random.logistic(k_noise, mean.shape, jnp.float32)
  if coeffs is None:
    return _bin_value(_quantise(mean + scale * noise))
  coeff = _pick(coeffs, component)
  draw = lambda c, m: _quantise(m + scale[..., c] * noise[..., c])
  k0 = draw(0, mean[..., 0])
  k1 = draw(1, mean[..., 1] + coeff[..., 0] * _centre(k0))
  k2 = draw(2, mean[..., 2] + coeff[..., 1] * _centre(k0) + coeff[..., 2] * _centre(k1))
  return _bin_value(jnp.stack([k0, k1, k2], axis=-1))


# --- The authors' parametrisation and training loss --------------------------------

_LOG_2 = math.log(2.0)
# Their mixture (PixelCNN++'s code) floors log-scales at -7 on the [0, 1] scale.
_AUTHORS_MIXTURE_MIN_LOG_SCALE = -7.0


def _coupling_shift(coeffs: jax.Array) -> jax.Array:
  """tanh coefficients [..., 3, M] -> the shift of each channel's raw mean: 0, c0, c1 + c2.

  On [0, 1] channel 2's mean is m2 + c1 x0 + c2 x1; with x = (y + 1) / 2 its
  mean on [-1, 1] is 2 m2 - 1 + c1 + c2 + c1 y0 + c2 y1 (channel 1 alike, with
  c0), so a coupling on [-1, 1]-scale values needs the raw mean 2 m - 1 + shift.
  """
  return jnp.stack(
    [jnp.zeros_like(coeffs[..., 0, :]), coeffs[..., 0, :], coeffs[..., 1, :] + coeffs[..., 2, :]],
    axis=-2,
  )


def from_unit_scale(
  likelihood: str, params: jax.Array, channels: int, num_mixtures: int
) -> jax.Array:
  """The authors' decoder outputs, read on the [0, 1] scale, as this module's parameters.

  Their outputs (already in this module's channel layout) hold means and
  log-scales of pixel values x in [0, 1]; here the same value is y = 2x - 1,
  so a logistic of mean m and log-scale s becomes one of mean 2m - 1 and
  log-scale s + log 2. For the mixture, their coupling acts on [0, 1]-scale
  values, and the raw means also take the shift of `_coupling_shift`; its
  coefficients pass through unchanged, and its log-scales are first floored
  at -7 on [0, 1] as theirs are. 'bernoulli' logits are returned as they are.

  The result's `nll` (bins that tile the line), `mean_image` and
  `sample_image` are those of the distribution the authors' outputs define
  (for 'logistic': their logistic on bins k/255 +- 0.5/255 that tile, with
  tails at the edges; their loss's own bins do not tile, so define no
  distribution). One proviso, for 'logistic': this module floors log-scales
  at MIN_LOG_SCALE on [-1, 1], i.e. at -7 - log 2 (a scale of 4.6e-4) on
  [0, 1], where the authors floor the scale only at 1e-7 (and cap the
  log-scale at 80). The mixture's floor is theirs, -7 on [0, 1], above ours,
  so its conversion is exact. Their training loss on the result is
  `authors_nll`.

  Args:
    likelihood: one of LIKELIHOODS.
    params: [B, H, W, num_outputs(likelihood, C, M)], the authors' values.
    channels: C.
    num_mixtures: M (mixture_logistic only).

  Returns:
    [B, H, W, P] float32, this module's [-1, 1]-scale parameters.
  """
  _check_name(likelihood)
  chex.assert_rank(params, 4)
  chex.assert_axis_dimension(params, -1, num_outputs(likelihood, channels, num_mixtures))
  params = jnp.asarray(params, jnp.float32)
  if likelihood == 'bernoulli':
    return params
  if likelihood == 'logistic':
    mean, log_scale = params[..., :channels], params[..., channels:]
    return jnp.concatenate([2.0 * mean - 1.0, log_scale + _LOG_2], axis=-1)
  logits, fields = _mixture_fields(params, channels, num_mixtures)
  means = 2.0 * fields[..., 0, :] - 1.0
  log_scales = jnp.maximum(fields[..., 1, :], _AUTHORS_MIXTURE_MIN_LOG_SCALE) + _LOG_2
  converted = [means, log_scales]
  if channels == _COUPLED_CHANNELS:
    raw_coeffs = fields[..., 2, :]
    converted = [means + _coupling_shift(jnp.tanh(raw_coeffs)), log_scales, raw_coeffs]
  fields = jnp.stack(converted, axis=-2)  # [B, H, W, C, F, M], the layout of the module doc.
  return jnp.concatenate([logits, fields.reshape(*params.shape[:-1], -1)], axis=-1)


# torch's binary_cross_entropy clamps each log at -100.
_TORCH_BCE_MIN_LOG = -100.0


def _torch_bce_logs(p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max(log p, -100), max(log1p(-p), -100)), as torch's binary_cross_entropy takes them.

  The -inf of log 0 is kept out of the computation, not only out of the value,
  so that the gradient of a saturated probability is 0 (torch's is too) and
  not NaN.
  """
  positive, below_one = p > 0.0, p < 1.0
  log_p = jnp.log(jnp.where(positive, p, 1.0))
  log_not_p = jnp.log1p(-jnp.where(below_one, p, 0.0))
  log_p = jnp.where(positive, jnp.maximum(log_p, _TORCH_BCE_MIN_LOG), _TORCH_BCE_MIN_LOG)
  log_not_p = jnp.where(below_one, jnp.maximum(log_not_p, _TORCH_BCE_MIN_LOG), _TORCH_BCE_MIN_LOG)
  return log_p, log_not_p


def _authors_bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
  """Their loss: binary_cross_entropy(sigmoid(logits), x), summed per image -> [B]."""
  log_p, log_not_p = _torch_bce_logs(jax.nn.sigmoid(logits))
  return -jnp.sum(x * log_p + (1.0 - x) * log_not_p, axis=(1, 2, 3))


# Their 'logistic' bins, on [0, 1]: half-width 0.5/256 around x = k/255.
_AUTHORS_HALF_BIN = 0.5 / 256
# x above this (k = 254, 255) takes the upper tail; below the next (k = 0), the lower.
_AUTHORS_UPPER_TAIL_ABOVE = 254 / 256
_AUTHORS_LOWER_TAIL_BELOW = 1 / 256
_AUTHORS_MIN_SCALE = 1e-7
_AUTHORS_MAX_LOG_SCALE = 80.0
_AUTHORS_MIN_MASS = 1e-7


def _authors_logistic_nll(params: jax.Array, x: jax.Array) -> jax.Array:
  """Their 'logistic' loss from [-1, 1]-scale params [B, H, W, 2C], x [B, H, W, C] -> [B]."""
  channels = x.shape[-1]
  # from_unit_scale undone: their mean and log-scale on [0, 1].
  mean = (params[..., :channels] + 1.0) * 0.5
  log_scale = params[..., channels:] - _LOG_2
  scale = jnp.maximum(jnp.exp(jnp.minimum(log_scale, _AUTHORS_MAX_LOG_SCALE)), _AUTHORS_MIN_SCALE)
  cdf_upper = jax.nn.sigmoid((x + _AUTHORS_HALF_BIN - mean) / scale)
  cdf_lower = jax.nn.sigmoid((x - _AUTHORS_HALF_BIN - mean) / scale)
  cdf_upper = jnp.where(x > _AUTHORS_UPPER_TAIL_ABOVE, 1.0, cdf_upper)
  cdf_lower = jnp.where(x < _AUTHORS_LOWER_TAIL_BELOW, 0.0, cdf_lower)
  mass = jnp.maximum(cdf_upper - cdf_lower, _AUTHORS_MIN_MASS)
  return -jnp.sum(jnp.log(mass), axis=(1, 2, 3))


# Their mixture's bins, on [0, 1]: width 1/255 around x = k/255 (these tile).
_AUTHORS_MIXTURE_BIN = 1.0 / (NUM_BINS - 1)
_AUTHORS_MIN_MID_MASS = 1e-12
# A bin mass at or below this is replaced by density x bin width (PixelCNN++).
_AUTHORS_APPROXIMATE_AT_OR_BELOW = 1e-5


def _authors_mixture_nll(params: jax.Array, x: jax.Array, num_mixtures: int) -> jax.Array:
  """Their 'mixture_logistic' loss (PixelCNN++'s) from [-1, 1]-scale params -> [B]."""
  channels = x.shape[-1]
  logits, means, log_scales, coeffs = _split_mixture(params, channels, num_mixtures)
  # from_unit_scale undone: their raw means and floored log-scales on [0, 1].
  if coeffs is not None:
    means = means - _coupling_shift(coeffs)
  means = (means + 1.0) * 0.5
  log_scales = jnp.maximum(log_scales - _LOG_2, _AUTHORS_MIXTURE_MIN_LOG_SCALE)
  x = x[..., None]  # [B, H, W, C, 1]
  means = _coupled_means(means, coeffs, x)  # Coupled on [0, 1]-scale values, as theirs.
  inv_scale = jnp.exp(-log_scales)
  centred = x - means
  upper = inv_scale * (centred + 0.5 * _AUTHORS_MIXTURE_BIN)
  lower = inv_scale * (centred - 0.5 * _AUTHORS_MIXTURE_BIN)
  # A difference of CDFs, as theirs: it cancels in the tails, hence their clamps.
  mid_mass = jax.nn.sigmoid(upper) - jax.nn.sigmoid(lower)
  log_mid = jnp.log(jnp.maximum(mid_mass, _AUTHORS_MIN_MID_MASS))
  standardised = inv_scale * centred
  log_density_times_bin = (
    standardised - log_scales - 2.0 * jax.nn.softplus(standardised) + math.log(_AUTHORS_MIXTURE_BIN)
  )
  log_bin = jnp.where(mid_mass > _AUTHORS_APPROXIMATE_AT_OR_BELOW, log_mid, log_density_times_bin)
  log_lower_tail = upper - jax.nn.softplus(upper)
  log_upper_tail = -jax.nn.softplus(lower)
  log_bin = jnp.where(x >= 0.5 * _AUTHORS_MIXTURE_BIN, log_bin, log_lower_tail)
  log_bin = jnp.where(x <= 1.0 - 0.5 * _AUTHORS_MIXTURE_BIN, log_bin, log_upper_tail)
  log_p_given_m = jnp.sum(log_bin, axis=-2)  # [B, H, W, M]
  log_p = jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + log_p_given_m, axis=-1)
  return -jnp.sum(log_p, axis=(1, 2))


def authors_nll(likelihood: str, params: jax.Array, x: jax.Array, num_mixtures: int) -> jax.Array:
  """The authors' training loss [B] in nats, from this module's parameters.

  `params` are on the [-1, 1] scale (as `from_unit_scale` returns them); the
  loss is computed the authors' way on the [0, 1] scale, differences of
  sigmoids and clamps included, to give their numbers (also where those are
  poor). This module's MIN_LOG_SCALE floor is not applied, theirs are.

  - 'bernoulli': torch's binary_cross_entropy of sigmoid(logits), whose logs
    are clamped at -100. It differs from `bernoulli_nll` where the float32
    sigmoid rounds to 1 (logit above about 16.6 with x = 0: 100 nats, not the
    logit) or to 0 (below about -88 with x = 1), and by its rounding of 1 - p
    for logits of about 10 to 16.6 with x = 0 (errors up to tenths of a nat).
    So it is reproduced here, not reused; its gradient is torch's too: p - x,
    and 0 where the sigmoid rounded. (torch's sigmoid keeps the denormals
    that XLA:CPU flushes to 0, so logits from about -88.5 to -87.5 with x = 1
    read 100 here and about 88 there.)
  - 'logistic': Base.compute_recont_loss: the scale is exp(min(s, 80)),
    floored at 1e-7; the bin of x = k/255 is x +- 0.5/256 (not tiling), k =
    254 and 255 take the upper tail and k = 0 the lower; each mass is floored
    at 1e-7.
  - 'mixture_logistic': dmol_loss: bins x +- 0.5/255 with tails at the edges,
    log-scales floored at -7 on [0, 1], the coupling on [0, 1]-scale x, log of
    the mid mass floored at 1e-12 and, where that mass is <= 1e-5, log density
    + log(1/255) instead. Their code has only C = 3; C = 1 is the same without
    coupling.

  Measured against their torch code (7355066, torch 2.14 on CPU, float32),
  their outputs mapped to this layout and through from_unit_scale, 6 images
  of 8x8x3 (log-scales from -20 to 2, means in [-0.2, 1.2], 20% edge bins):
  largest relative error per image 2.1e-7 ('logistic') and 5.9e-7
  ('mixture_logistic'); per pixel 2.8e-5 and 8.0e-6, where the cancelling
  differences of sigmoids amplify the round-off of the parameters (their own
  float32 'logistic' losses there are up to 0.9% off the float64 value of
  their formula). 'bernoulli', 6 images of 28x28 with logits of sd 12:
  1.7e-7 (`bernoulli_nll` is up to 39% off there). The tests check the
  formulas without torch (tests/distributions_test.py).

  Args:
    likelihood: one of LIKELIHOODS.
    params: [B, H, W, num_outputs(likelihood, C, M)].
    x: [B, H, W, C] images, values k/255 (0/1 for 'bernoulli').
    num_mixtures: M.

  Returns:
    [B] nats per image.
  """
  _check_name(likelihood)
  chex.assert_rank(x, 4)
  channels = x.shape[-1]
  chex.assert_shape(params, (*x.shape[:3], num_outputs(likelihood, channels, num_mixtures)))
  params = jnp.asarray(params, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  if likelihood == 'bernoulli':
    return _authors_bernoulli_nll(params, x)
  if likelihood == 'logistic':
    return _authors_logistic_nll(params, x)
  return _authors_mixture_nll(params, x, num_mixtures)


# --- Latent distributions ----------------------------------------------------------


def bernoulli_kl(q_logit: jax.Array, p_logit: jax.Array) -> jax.Array:
  """KL(Bern(sigmoid q) || Bern(sigmoid p)), element-wise, same shape."""
  chex.assert_equal_shape([q_logit, p_logit])
  q_logit = jnp.asarray(q_logit, jnp.float32)
  p_logit = jnp.asarray(p_logit, jnp.float32)
  # sigmoid(-q) rather than 1 - sigmoid(q): keeps precision when q is large.
  one = jax.nn.sigmoid(q_logit) * (jax.nn.log_sigmoid(q_logit) - jax.nn.log_sigmoid(p_logit))
  zero = jax.nn.sigmoid(-q_logit) * (jax.nn.log_sigmoid(-q_logit) - jax.nn.log_sigmoid(-p_logit))
  return one + zero


def categorical_kl(q_logits: jax.Array, p_logits: jax.Array) -> jax.Array:
  """KL(Cat(softmax q) || Cat(softmax p)) over the last axis: [..., K] -> [...]."""
  chex.assert_equal_shape([q_logits, p_logits])
  log_q = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)


def bernoulli_log_prob(logit: jax.Array, value: jax.Array) -> jax.Array:
  """log Bern(value; sigmoid(logit)), value bool or float in {0, 1}; same shape."""
  chex.assert_equal_shape([logit, value])
  logit = jnp.asarray(logit, jnp.float32)
  value = jnp.asarray(value, jnp.float32)
  return value * jax.nn.log_sigmoid(logit) + (1.0 - value) * jax.nn.log_sigmoid(-logit)


def categorical_log_prob(logits: jax.Array, index: jax.Array) -> jax.Array:
  """log softmax(logits)[index]: logits [..., K], int index [...] -> [...]."""
  chex.assert_shape(index, logits.shape[:-1])
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, index[..., None].astype(jnp.int32), axis=-1)[..., 0]
