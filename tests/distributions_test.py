"""Pixel likelihoods and latent distributions against direct NumPy/SciPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import special, stats

from npdraw_jax import distributions

BINS = 256

# Jitted once per shape: much faster here than op-by-op dispatch (which
# TransformTest still checks against).
nll = jax.jit(distributions.nll, static_argnums=(0, 3))
mean_image = jax.jit(distributions.mean_image, static_argnums=(0, 2))
sample_image = jax.jit(distributions.sample_image, static_argnums=(0, 3))


# --- Independent references (float64) ----------------------------------------------


def ref_bin_probs(k, mean, log_scale):
  """P(bin k) from differences of scipy's logistic CDF on the [-1, 1] scale.

  Bin k is [c - 1/255, c + 1/255] around c = 2k/255 - 1; bin 0 extends to -inf
  and bin 255 to +inf. The scale is exp(log_scale) floored at exp(-7).
  """
  k, mean, log_scale = np.broadcast_arrays(k, np.float64(mean), np.float64(log_scale))
  scale = np.exp(np.maximum(log_scale, -7.0))
  centre = 2.0 * k / 255.0 - 1.0
  upper = np.where(k == 255, np.inf, centre + 1.0 / 255.0)
  lower = np.where(k == 0, -np.inf, centre - 1.0 / 255.0)
  # Right of the mean, differences of the survival function avoid cancelling near 1.
  by_cdf = stats.logistic.cdf(upper, mean, scale) - stats.logistic.cdf(lower, mean, scale)
  by_sf = stats.logistic.sf(lower, mean, scale) - stats.logistic.sf(upper, mean, scale)
  return np.where(centre <= mean, by_cdf, by_sf)


def ref_log_bin_prob_tail(k, mean, log_scale):
  """log P(bin k) in log space from scipy's logcdf/logsf, for bins deep in a tail."""
  scale = np.exp(max(log_scale, -7.0))
  centre = 2.0 * k / 255.0 - 1.0
  lo, hi = centre - 1.0 / 255.0, centre + 1.0 / 255.0
  if k == 0:
    return stats.logistic.logcdf(hi, mean, scale)
  if k == 255:
    return stats.logistic.logsf(lo, mean, scale)
  if centre <= mean:  # Left of the mean: the CDF is the small side.
    a, b = stats.logistic.logcdf(hi, mean, scale), stats.logistic.logcdf(lo, mean, scale)
  else:
    a, b = stats.logistic.logsf(lo, mean, scale), stats.logistic.logsf(hi, mean, scale)
  return a + np.log1p(-np.exp(b - a))


def mixture_field(params, m, c, field, channels, num_mixtures):
  """params[..., index] of the documented layout: logits, then per channel (means, log-scales,
  coefficients), each a block of M."""
  per_channel = 3 if channels == 3 else 2
  return params[..., num_mixtures + c * per_channel * num_mixtures + field * num_mixtures + m]


def ref_mixture_pixel_log_probs(params, k, num_mixtures):
  """log p(pixel) [...] by a loop over components, params [..., P], bins k [..., C]."""
  channels = k.shape[-1]
  params = params.astype(np.float64)
  log_weights = special.log_softmax(params[..., :num_mixtures], axis=-1)
  centres = 2.0 * k / 255.0 - 1.0
  per_component = []
  for m in range(num_mixtures):
    field = lambda c, f, m=m: mixture_field(params, m, c, f, channels, num_mixtures)
    log_p = log_weights[..., m]
    for c in range(channels):
      mean = field(c, 0)
      if channels == 3 and c == 1:
        mean = mean + np.tanh(field(0, 2)) * centres[..., 0]
      if channels == 3 and c == 2:
        mean = (
          mean + np.tanh(field(1, 2)) * centres[..., 0] + np.tanh(field(2, 2)) * centres[..., 1]
        )
      log_p = log_p + np.log(ref_bin_probs(k[..., c], mean, field(c, 1)))
    per_component.append(log_p)
  return special.logsumexp(np.stack(per_component, -1), axis=-1)


def random_bins(rng, shape):
  """Random bins with plenty of the edge bins 0 and 255."""
  k = rng.integers(0, BINS, size=shape)
  edge = rng.uniform(size=shape)
  k[edge < 0.15] = 0
  k[edge > 0.85] = 255
  return k


def single_subpixel_grid(mean, log_scale):
  """All 256 values of one sub-pixel as a batch: params [256, 1, 1, 2], x [256, 1, 1, 1]."""
  params = np.broadcast_to(np.float32([mean, log_scale]), (BINS, 1, 1, 2))
  x = (np.arange(BINS, dtype=np.float32) / 255.0).reshape(BINS, 1, 1, 1)
  return params, x


def random_mixture_params(rng, shape, channels, num_mixtures, log_scale=(-4.0, -0.5)):
  p = distributions.num_outputs('mixture_logistic', channels, num_mixtures)
  params = np.zeros((*shape, p), np.float32)
  params[..., :num_mixtures] = rng.normal(size=(*shape, num_mixtures))
  for m in range(num_mixtures):
    for c in range(channels):
      base = num_mixtures + c * (p - num_mixtures) // channels
      params[..., base + m] = rng.uniform(-1.1, 1.1, size=shape)
      params[..., base + num_mixtures + m] = rng.uniform(*log_scale, size=shape)
      if channels == 3:
        params[..., base + 2 * num_mixtures + m] = rng.normal(size=shape)
  return params


# --- Tests -------------------------------------------------------------------------


class NumOutputsTest(parameterized.TestCase):
  @parameterized.parameters(
    ('bernoulli', 1, 10, 1),
    ('bernoulli', 3, 10, 3),
    ('logistic', 3, 10, 6),
    ('mixture_logistic', 3, 10, 100),
    ('mixture_logistic', 1, 5, 15),
  )
  def test_counts(self, likelihood, channels, mixtures, expected):
    self.assertEqual(distributions.num_outputs(likelihood, channels, mixtures), expected)

  def test_invalid(self):
    with self.assertRaisesRegex(ValueError, 'bernoulli'):
      distributions.num_outputs('gaussian', 3, 1)
    with self.assertRaisesRegex(ValueError, r'\(1, 3\)'):
      distributions.num_outputs('mixture_logistic', 2, 10)
    params, x = jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1))
    for fn in (
      lambda: distributions.nll('gaussian', params, x, 1),
      lambda: distributions.mean_image('gaussian', params, 1),
      lambda: distributions.sample_image('gaussian', jax.random.key(0), params, 1),
    ):
      with self.assertRaisesRegex(ValueError, 'Unknown likelihood'):
        fn()


class BernoulliTest(parameterized.TestCase):
  def test_nll_matches_numpy(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(3, 4, 5, 2)).astype(np.float32)
    x = (rng.uniform(size=logits.shape) < 0.4).astype(np.float32)
    p = special.expit(logits.astype(np.float64))
    expected = -np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), axis=(1, 2, 3))
    got = nll('bernoulli', logits, x, 1)
    self.assertEqual(got.shape, (3,))
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_log_prob_and_kl_closed_form(self):
    rng = np.random.default_rng(1)
    q, p = rng.normal(scale=4.0, size=(2, 6, 7)).astype(np.float32)
    value = rng.uniform(size=q.shape) < 0.5
    q64, p64 = q.astype(np.float64), p.astype(np.float64)
    sq, sp = special.expit(q64), special.expit(p64)
    np.testing.assert_allclose(
      distributions.bernoulli_log_prob(q, value),
      np.where(value, np.log(sq), np.log1p(-sq)),
      rtol=1e-5,
      atol=1e-6,
    )
    # Float and bool values agree.
    np.testing.assert_array_equal(
      distributions.bernoulli_log_prob(q, value), distributions.bernoulli_log_prob(q, 1.0 * value)
    )
    expected = sq * np.log(sq / sp) + (1 - sq) * np.log((1 - sq) / (1 - sp))
    got = distributions.bernoulli_kl(q, p)
    self.assertEqual(got.shape, q.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(distributions.bernoulli_kl(q, q), 0.0, atol=1e-6)

  def test_kl_extreme_logits_are_finite(self):
    q = jnp.float32([-60.0, 60.0, 30.0, -30.0])
    p = jnp.float32([60.0, -60.0, 30.0, 0.0])
    kl = distributions.bernoulli_kl(q, p)
    # The mass sits on the value where q and p disagree by 60 nats (first two).
    np.testing.assert_allclose(kl, [60.0, 60.0, 0.0, np.log(2.0)], rtol=1e-4, atol=1e-6)
    grad = jax.grad(lambda q: jnp.sum(distributions.bernoulli_kl(q, p)))(q)
    self.assertTrue(np.all(np.isfinite(grad)))

  def test_kl_monte_carlo(self):
    q = np.float32([-1.5, 0.3, 2.0])
    p = np.float32([0.5, -0.7, 2.5])
    n = 400_000
    draws = np.random.default_rng(2).uniform(size=(n, 3)) < special.expit(q)
    log_ratio = np.where(
      draws,
      np.log(special.expit(q)) - np.log(special.expit(p)),
      np.log(special.expit(-q)) - np.log(special.expit(-p)),
    )
    estimate, se = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
    got = np.asarray(distributions.bernoulli_kl(q, p))
    self.assertTrue(np.all(np.abs(got - estimate) < 5 * se + 1e-6), (got, estimate, se))

  def test_mean_and_samples(self):
    logits = np.float32([[-3.0, -0.5], [0.0, 1.5]]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(mean_image('bernoulli', logits, 1), special.expit(logits), rtol=1e-6)
    n = 40_000
    many = np.broadcast_to(logits, (n, 2, 2, 1))
    samples = np.asarray(sample_image('bernoulli', jax.random.key(3), many, 1))
    self.assertEqual(samples.shape, many.shape)
    self.assertEqual(samples.dtype, np.float32)
    self.assertTrue(np.all((samples == 0) | (samples == 1)))
    p = special.expit(logits[0])
    freq, se = samples.mean(0), np.sqrt(p * (1 - p) / n)
    self.assertTrue(np.all(np.abs(freq - p) < 5 * se), (freq, p))


class LogisticTest(parameterized.TestCase):
  def test_subpixel_log_probs_match_scipy(self):
    rng = np.random.default_rng(4)
    n = 2000
    mean = rng.uniform(-1.3, 1.3, size=n)
    log_scale = rng.uniform(-6.0, 0.5, size=n)
    k = random_bins(rng, n)
    # Means near the value, so that interior bins carry real mass too.
    near = rng.uniform(size=n) < 0.5
    mean[near] = 2.0 * k[near] / 255.0 - 1.0 + rng.normal(scale=0.02, size=near.sum())
    params = np.stack([mean, log_scale], -1).astype(np.float32).reshape(n, 1, 1, 2)
    x = (k / 255.0).astype(np.float32).reshape(n, 1, 1, 1)
    expected = -np.log(ref_bin_probs(k, params[:, 0, 0, 0], params[:, 0, 0, 1]))
    got = nll('logistic', params, x, 1)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    self.assertGreater(np.sum((k == 0) | (k == 255)), 400)

  def test_image_nll_matches_scipy(self):
    rng = np.random.default_rng(5)
    shape = (2, 3, 4, 3)
    k = random_bins(rng, shape)
    mean = rng.uniform(-1.2, 1.2, size=shape)
    log_scale = rng.uniform(-4.0, 0.0, size=shape)
    params = np.concatenate([mean, log_scale], -1).astype(np.float32)
    expected = -np.sum(np.log(ref_bin_probs(k, params[..., :3], params[..., 3:])), axis=(1, 2, 3))
    got = nll('logistic', params, (k / 255.0).astype(np.float32), 1)
    self.assertEqual(got.shape, (2,))
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  @parameterized.parameters(
    (0.0, 0.0),
    (0.3, -3.0),
    (-0.99, -6.0),
    (1.5, -2.0),
    (-3.0, 1.0),
    (0.2, -9.0),  # Below the floor: scored at log-scale -7.
    (0.0, 4.0),
  )
  def test_bins_sum_to_one(self, mean, log_scale):
    params, x = single_subpixel_grid(mean, log_scale)
    probs = np.exp(-np.asarray(nll('logistic', params, x, 1), np.float64))
    np.testing.assert_allclose(probs.sum(), 1.0, atol=2e-5)
    np.testing.assert_allclose(probs, ref_bin_probs(np.arange(BINS), mean, log_scale), atol=2e-6)

  @parameterized.parameters(
    (0, 1.0, -7.0),  # The lower edge bin, deep in the left tail.
    (10, 1.0, -7.0),
    (128, -1.0, -7.0),
    (250, -1.0, -6.5),
    (255, -1.0, -7.0),  # The upper edge bin, deep in the right tail.
    (200, 0.0, -5.0),
    (3, 0.9, -4.0),
  )
  def test_tail_bins_accurate_and_differentiable(self, k, mean, log_scale):
    params = jnp.float32([mean, log_scale]).reshape(1, 1, 1, 2)
    x = jnp.float32([k / 255.0]).reshape(1, 1, 1, 1)
    expected = -ref_log_bin_prob_tail(k, np.float32(mean), np.float32(log_scale))
    self.assertGreater(expected, 20.0)  # Mass below e^-20: plain CDF differences fail here.
    got, grad = jax.jit(jax.value_and_grad(lambda p: nll('logistic', p, x, 1)[0]))(params)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    self.assertTrue(np.all(np.isfinite(grad)))

  @parameterized.parameters(8.0, 12.0, 60.0)
  def test_wide_logistic(self, log_scale):
    # A scale far larger than a bin: the bin's mass is width * density to O(width^2).
    params, x = single_subpixel_grid(0.1, log_scale)
    got, grad = jax.jit(jax.value_and_grad(lambda p: jnp.sum(nll('logistic', p, x, 1))))(params)
    k = np.arange(1, 255)
    z = ((2.0 * k / 255.0 - 1.0) - 0.1) / np.exp(log_scale)
    density = np.exp(-z) / (1 + np.exp(-z)) ** 2
    interior = -(np.log(2.0 / 255.0) - log_scale + np.log(density))
    np.testing.assert_allclose(np.asarray(nll('logistic', params, x, 1))[1:-1], interior, rtol=1e-5)
    self.assertTrue(np.isfinite(got))
    self.assertTrue(np.all(np.isfinite(grad)))

  def test_mean_image(self):
    means = np.float32([-1.4, -0.2, 0.5, 1.2]).reshape(1, 2, 2, 1)
    params = np.concatenate([means, np.full_like(means, -2.0)], -1)
    got = mean_image('logistic', params, 1)
    np.testing.assert_allclose(got[..., 0].ravel(), [0.0, 0.4, 0.75, 1.0], rtol=1e-6)

  @parameterized.parameters((-0.95, -3.5), (0.97, -3.0), (0.1, -5.0))
  def test_samples_follow_bin_probabilities(self, mean, log_scale):
    n = 100_000
    params = np.broadcast_to(np.float32([mean, log_scale]), (n, 1, 1, 2))
    samples = np.asarray(sample_image('logistic', jax.random.key(6), params, 1))
    self.assertEqual(samples.shape, (n, 1, 1, 1))
    self.assertTrue(np.all((samples >= 0) & (samples <= 1)))
    k = np.round(samples * 255.0).ravel()
    np.testing.assert_allclose(samples.ravel(), (k / 255.0).astype(np.float32), rtol=0, atol=0)
    probs = ref_bin_probs(np.arange(BINS), np.float32(mean), np.float32(log_scale))
    values = np.arange(BINS) / 255.0
    true_mean = np.sum(probs * values)
    true_sd = np.sqrt(np.sum(probs * (values - true_mean) ** 2))
    self.assertLess(abs(samples.mean() - true_mean), 5 * true_sd / np.sqrt(n))
    counts = np.bincount(k.astype(int), minlength=BINS)
    expected = n * probs
    big = expected > 20
    chi2 = np.sum((counts[big] - expected[big]) ** 2 / expected[big])
    self.assertLess(chi2, stats.chi2.ppf(1 - 1e-5, big.sum()))
    self.assertLess(
      counts[~big].sum(), expected[~big].sum() + 5 * np.sqrt(expected[~big].sum() + 1)
    )


class MixtureTest(parameterized.TestCase):
  @parameterized.parameters(1, 3)
  def test_nll_matches_numpy(self, channels):
    rng = np.random.default_rng(7)
    mixtures = 3
    k = random_bins(rng, (2, 3, 4, channels))
    params = random_mixture_params(rng, k.shape[:3], channels, mixtures)
    expected = -np.sum(ref_mixture_pixel_log_probs(params, k, mixtures), axis=(1, 2))
    got = nll('mixture_logistic', params, (k / 255.0).astype(np.float32), mixtures)
    self.assertEqual(got.shape, (2,))
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_grey_bins_sum_to_one(self):
    params = random_mixture_params(np.random.default_rng(8), (1,), 1, 4)
    params = np.broadcast_to(params, (BINS, 1, 1, params.shape[-1]))
    x = (np.arange(BINS, dtype=np.float32) / 255.0).reshape(BINS, 1, 1, 1)
    probs = np.exp(-np.asarray(nll('mixture_logistic', params, x, 4), np.float64))
    np.testing.assert_allclose(probs.sum(), 1.0, atol=2e-5)

  @parameterized.parameters((0, 77), (140, 255), (201, 30))
  def test_colour_marginals(self, k0, k1):
    # Summing p(x0, x1, x2) over x2 leaves p(x0, x1) = sum_m pi_m p(x0 | m) p(x1 | m, x0),
    # and summing over (x1, x2) leaves p(x0) = sum_m pi_m p(x0 | m): x1 enters the mean of x2.
    mixtures = 3
    params = random_mixture_params(np.random.default_rng(k0 + k1), (1,), 3, mixtures)
    field = lambda m, c, f: mixture_field(params[0].astype(np.float64), m, c, f, 3, mixtures)
    weights = special.softmax(params[0, :mixtures].astype(np.float64))
    y0 = 2.0 * k0 / 255.0 - 1.0
    p0 = np.array([ref_bin_probs(k0, field(m, 0, 0), field(m, 0, 1)) for m in range(mixtures)])
    p1 = np.array(
      [
        ref_bin_probs(k1, field(m, 1, 0) + np.tanh(field(m, 0, 2)) * y0, field(m, 1, 1))
        for m in range(mixtures)
      ]
    )
    nll_of = lambda k: nll(
      'mixture_logistic',
      np.broadcast_to(params, (len(k), 1, 1, params.shape[-1])),
      (k / 255.0).astype(np.float32).reshape(-1, 1, 1, 3),
      mixtures,
    )
    grid = np.arange(BINS)
    over_x2 = np.stack([np.full(BINS, k0), np.full(BINS, k1), grid], -1)
    pair = np.exp(special.logsumexp(-np.asarray(nll_of(over_x2), np.float64)))
    np.testing.assert_allclose(pair, np.sum(weights * p0 * p1), rtol=1e-4)
    x1, x2 = np.meshgrid(grid, grid, indexing='ij')
    over_x1_x2 = np.stack([np.full(x1.size, k0), x1.ravel(), x2.ravel()], -1)
    single = np.exp(special.logsumexp(-np.asarray(nll_of(over_x1_x2), np.float64)))
    np.testing.assert_allclose(single, np.sum(weights * p0), rtol=1e-4)

  def test_mean_image_takes_most_likely_component(self):
    m = 2
    params = np.zeros((1, 1, 2, 10 * m), np.float32)
    # Pixel 0: component 1 dominates; pixel 1: component 0.
    params[0, 0, 0, :m] = [0.1, 2.0]
    params[0, 0, 1, :m] = [1.0, -1.0]
    means = np.float32([[0.2, 0.5, -0.3], [-0.4, 0.9, 0.95]])  # [pixel, channel]
    raw = np.float32([[0.0, 0.0, 0.0], [1.0, -0.5, 2.0]])  # coefficients c0, c1, c2 per pixel
    for px, comp in ((0, 1), (1, 0)):
      for c in range(3):
        params[0, 0, px, m + c * 3 * m + comp] = means[px, c]
        params[0, 0, px, m + c * 3 * m + 2 * m + comp] = raw[px, c]
    got = np.asarray(mean_image('mixture_logistic', params, m))[0, 0]
    # Pixel 0 has no coupling; pixel 1 by hand: y0 = -0.4,
    # y1 = clip(0.9 + tanh(1) * -0.4) = 0.5954, y2 = 0.95 + tanh(-0.5) * -0.4 + tanh(2) * y1.
    c0, c1, c2 = np.tanh(raw[1])
    y1 = 0.9 + c0 * -0.4
    y2 = min(0.95 + c1 * -0.4 + c2 * y1, 1.0)
    expected = (np.float32([[0.2, 0.5, -0.3], [-0.4, y1, y2]]) + 1) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    self.assertEqual(got[1, 2], 1.0)  # Clipped.

  @parameterized.parameters(1, 3)
  def test_samples_follow_nll(self, channels):
    # Sharp components put nearly all mass on a few colours; the sampled colours'
    # frequencies must match exp(-nll), coupling on the drawn values included.
    m, n = 2, 60_000
    params = np.zeros((1, 1, 1, distributions.num_outputs('mixture_logistic', channels, m)))
    params[..., :m] = [0.4, -0.3]
    per = 3 if channels == 3 else 2
    centre = lambda k: 2.0 * k / 255.0 - 1.0
    for comp, means in ((0, (centre(60.3), centre(40.0), centre(200.6))), (1, (0.5, -0.5, 0.1))):
      for c in range(channels):
        params[..., m + c * per * m + comp] = means[c]
        params[..., m + c * per * m + m + comp] = -6.0
        if channels == 3:
          params[..., m + c * per * m + 2 * m + comp] = [0.9, -0.6, 1.3][c]
    params = np.broadcast_to(params.astype(np.float32), (n, 1, 1, params.shape[-1]))
    samples = np.asarray(sample_image('mixture_logistic', jax.random.key(9), params, m)).reshape(
      n, channels
    )
    k = np.round(samples * 255.0).astype(int)
    np.testing.assert_array_equal(samples, (k / 255.0).astype(np.float32))
    colours, counts = np.unique(k, axis=0, return_counts=True)
    probs = np.exp(
      -np.asarray(
        nll(
          'mixture_logistic',
          params[: len(colours)],
          (colours / 255.0).astype(np.float32).reshape(-1, 1, 1, channels),
          m,
        ),
        np.float64,
      )
    )
    self.assertGreater(probs.sum(), 0.999)  # Nothing likely is missing.
    self.assertLess(len(colours), 200)
    expected = n * probs
    self.assertTrue(
      np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 2), (counts, expected)
    )


class CategoricalTest(parameterized.TestCase):
  def test_kl_and_log_prob_closed_form(self):
    rng = np.random.default_rng(10)
    q, p = rng.normal(scale=2.0, size=(2, 3, 4, 7)).astype(np.float32)
    lq, lp = special.log_softmax(q.astype(np.float64), -1), special.log_softmax(p, -1)
    got = distributions.categorical_kl(q, p)
    self.assertEqual(got.shape, (3, 4))
    np.testing.assert_allclose(got, np.sum(np.exp(lq) * (lq - lp), -1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(distributions.categorical_kl(q, q), 0.0, atol=1e-6)
    index = rng.integers(0, 7, size=(3, 4))
    np.testing.assert_allclose(
      distributions.categorical_log_prob(q, index),
      np.take_along_axis(lq, index[..., None], -1)[..., 0],
      rtol=1e-5,
    )

  def test_kl_monte_carlo(self):
    q = np.float32([1.0, -0.5, 0.2, 2.0])
    p = np.float32([0.0, 0.5, -1.0, 1.5])
    lq, lp = special.log_softmax(q.astype(np.float64)), special.log_softmax(p.astype(np.float64))
    n = 400_000
    draws = np.random.default_rng(11).choice(4, size=n, p=np.exp(lq))
    log_ratio = (lq - lp)[draws]
    se = log_ratio.std() / np.sqrt(n)
    got = float(distributions.categorical_kl(q, p))
    self.assertLess(abs(got - log_ratio.mean()), 5 * se)

  def test_kl_large_logits_finite(self):
    q = jnp.float32([[80.0, -80.0, 0.0]])
    p = jnp.float32([[-80.0, 80.0, 0.0]])
    np.testing.assert_allclose(distributions.categorical_kl(q, p), [160.0], rtol=1e-5)
    grad = jax.grad(lambda q: jnp.sum(distributions.categorical_kl(q, p)))(q)
    self.assertTrue(np.all(np.isfinite(grad)))


class TransformTest(parameterized.TestCase):
  """jit, vmap and grad of every likelihood."""

  @parameterized.parameters(('bernoulli', 3, 1), ('logistic', 3, 1), ('mixture_logistic', 3, 2))
  def test_jit_vmap_grad(self, likelihood, channels, mixtures):
    rng = np.random.default_rng(12)
    p = distributions.num_outputs(likelihood, channels, mixtures)
    params = rng.normal(size=(3, 2, 4, 4, p)).astype(np.float32)
    x = rng.integers(0, BINS, size=(3, 2, 4, 4, channels)) / 255.0
    if likelihood == 'bernoulli':
      x = np.round(x)
    x = x.astype(np.float32)
    fn = lambda a, b: distributions.nll(likelihood, a, b, mixtures)
    vmapped = np.asarray(jax.jit(jax.vmap(fn))(params, x))
    self.assertEqual(vmapped.shape, (3, 2))
    # vmap over a leading axis = one batch of all images; op-by-op = jit.
    flat = nll(
      likelihood, params.reshape(6, *params.shape[2:]), x.reshape(6, *x.shape[2:]), mixtures
    )
    np.testing.assert_allclose(vmapped.ravel(), flat, rtol=1e-6)
    direct = {
      'bernoulli': lambda: distributions.bernoulli_nll(params[0], x[0]),
      'logistic': lambda: distributions.logistic_nll(params[0], x[0]),
      'mixture_logistic': lambda: distributions.mixture_logistic_nll(params[0], x[0], mixtures),
    }[likelihood]()
    np.testing.assert_allclose(direct, vmapped[0], rtol=1e-5)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(fn(a, x[0]))))(params[0])
    self.assertEqual(grad.shape, params[0].shape)
    self.assertTrue(np.all(np.isfinite(grad)))
    self.assertGreater(float(jnp.max(jnp.abs(grad))), 0.0)
    mean = distributions.mean_image(likelihood, params[0], mixtures)
    sample = sample_image(likelihood, jax.random.key(0), params[0], mixtures)
    for image in (mean, sample):
      self.assertEqual(image.shape, x[0].shape)
      self.assertEqual(image.dtype, jnp.float32)
      self.assertTrue(np.all((image >= 0) & (image <= 1)))


if __name__ == '__main__':
  absltest.main()
