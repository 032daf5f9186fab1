"""Pixel likelihoods and latent distributions against direct NumPy/SciPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import special, stats

from npdraw_jax import errors
from npdraw_jax.model import distributions

BINS = 256

# Jitted once per shape: much faster here than op-by-op dispatch (which
# TransformTest still checks against).
nll = jax.jit(distributions.nll, static_argnums=(0, 3))
mean_image = jax.jit(distributions.mean_image, static_argnums=(0, 2))
sample_image = jax.jit(distributions.sample_image, static_argnums=(0, 3))
authors_nll = jax.jit(distributions.authors_nll, static_argnums=(0, 3))
from_unit_scale = jax.jit(distributions.from_unit_scale, static_argnums=(0, 2, 3))


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


# --- The authors' conventions, on the [0, 1] scale (float64) -----------------------


def ref_unit_bin_probs(k, mean, log_scale):
  """P(bin k) on [0, 1], bins tiling the line: k/255 +- 0.5/255, bin 0 down to -inf and
  bin 255 up to +inf; scale exp(log_scale), no floor."""
  k, mean, log_scale = np.broadcast_arrays(k, np.float64(mean), np.float64(log_scale))
  scale = np.exp(log_scale)
  centre = k / 255.0
  upper = np.where(k == 255, np.inf, centre + 0.5 / 255.0)
  lower = np.where(k == 0, -np.inf, centre - 0.5 / 255.0)
  by_cdf = stats.logistic.cdf(upper, mean, scale) - stats.logistic.cdf(lower, mean, scale)
  by_sf = stats.logistic.sf(lower, mean, scale) - stats.logistic.sf(upper, mean, scale)
  return np.where(centre <= mean, by_cdf, by_sf)


def ref_authors_logistic_log_probs(x, mean, log_scale):
  """Their 'logistic' log-mass per sub-pixel on [0, 1] (Base.compute_recont_loss).

  The bin of x is x +- 0.5/256 (these do not tile); x > 254/256 takes the upper
  tail, x < 1/256 the lower; scale exp(min(s, 80)) floored at 1e-7; mass
  floored at 1e-7.
  """
  x, mean, log_scale = (np.float64(a) for a in (x, mean, log_scale))
  scale = np.maximum(np.exp(np.minimum(log_scale, 80.0)), 1e-7)
  upper = np.where(x > 254 / 256, 1.0, special.expit((x + 0.5 / 256 - mean) / scale))
  lower = np.where(x < 1 / 256, 0.0, special.expit((x - 0.5 / 256 - mean) / scale))
  return np.log(np.maximum(upper - lower, 1e-7))


def ref_authors_subpixel_log_prob(x, mean, log_scale):
  """Their mixture's log-mass of one sub-pixel x on [0, 1] (dmol_loss), mean already coupled.

  Log-scale floored at -7; x < 0.5/255 takes the lower tail, x > 1 - 0.5/255 the
  upper; an interior bin of mass <= 1e-5 scores log density + log(1/255).
  """
  scale = np.exp(max(log_scale, -7.0))
  half = 0.5 / 255.0
  if x < half:
    return stats.logistic.logcdf(x + half, mean, scale)
  if x > 1.0 - half:
    return stats.logistic.logsf(x - half, mean, scale)
  mass = stats.logistic.cdf(x + half, mean, scale) - stats.logistic.cdf(x - half, mean, scale)
  if mass > 1e-5:
    return np.log(max(mass, 1e-12))
  return stats.logistic.logpdf(x, mean, scale) + np.log(1.0 / 255.0)


def unit_coupled_means(unit_params, x, m, channels, num_mixtures):
  """Component m's per-channel means on [0, 1], coupled on [0, 1]-scale x [C]."""
  field = lambda c, f: mixture_field(unit_params, m, c, f, channels, num_mixtures)
  means = [field(c, 0) for c in range(channels)]
  if channels == 3:
    means[1] = means[1] + np.tanh(field(0, 2)) * x[0]
    means[2] = means[2] + np.tanh(field(1, 2)) * x[0] + np.tanh(field(2, 2)) * x[1]
  return means


def ref_mixture_on_unit_scale(unit_params, x, num_mixtures, subpixel_log_prob):
  """log p(pixel) of a mixture given on [0, 1]: unit_params [P] (our layout), x [C].

  subpixel_log_prob(x, k, mean, log_scale) scores one coupled sub-pixel.
  """
  channels = x.shape[-1]
  unit_params = unit_params.astype(np.float64)
  log_weights = special.log_softmax(unit_params[:num_mixtures])
  per_component = []
  for m in range(num_mixtures):
    means = unit_coupled_means(unit_params, x, m, channels, num_mixtures)
    log_p = log_weights[m]
    for c in range(channels):
      log_scale = mixture_field(unit_params, m, c, 1, channels, num_mixtures)
      log_p += subpixel_log_prob(x[c], means[c], log_scale)
    per_component.append(log_p)
  return special.logsumexp(per_component)


def ref_authors_mixture_nll(unit_params, x, num_mixtures):
  """Their mixture loss [B]: unit_params [B, H, W, P] (our layout, [0, 1] scale), x [B, H, W, C]."""
  flat_params = unit_params.reshape(-1, unit_params.shape[-1])
  flat_x = np.float64(x).reshape(-1, x.shape[-1])
  log_p = [
    ref_mixture_on_unit_scale(p, v, num_mixtures, ref_authors_subpixel_log_prob)
    for p, v in zip(flat_params, flat_x, strict=True)
  ]
  return -np.sum(np.reshape(log_p, x.shape[:3]), axis=(1, 2))


def ref_tiling_mixture_nll(unit_params, k, num_mixtures):
  """The proper mixture nll [B] on [0, 1] of bins k [B, H, W, C]; log-scales floored at -7."""
  flat_params = unit_params.reshape(-1, unit_params.shape[-1])
  flat_k = k.reshape(-1, k.shape[-1])

  def score(value, mean, log_scale):
    # A bin thousands of scales away has mass 0 in float64; other components carry the pixel.
    with np.errstate(divide='ignore'):
      return np.log(ref_unit_bin_probs(np.round(value * 255.0), mean, max(log_scale, -7.0)))

  log_p = [
    ref_mixture_on_unit_scale(p, bins / 255.0, num_mixtures, score)
    for p, bins in zip(flat_params, flat_k, strict=True)
  ]
  return -np.sum(np.reshape(log_p, k.shape[:3]), axis=(1, 2))


def random_unit_mixture_params(rng, shape, channels, num_mixtures, log_scale):
  """Mixture parameters on [0, 1] in our layout: means in [-0.1, 1.1]."""
  params = random_mixture_params(rng, shape, channels, num_mixtures, log_scale)
  for m in range(num_mixtures):
    for c in range(channels):
      base = num_mixtures + c * (params.shape[-1] - num_mixtures) // channels
      params[..., base + m] = rng.uniform(-0.1, 1.1, size=shape)
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


class UnitScaleTest(parameterized.TestCase):
  """from_unit_scale: the authors' [0, 1]-scale outputs rewritten exactly as our parameters."""

  def test_convention_names(self):
    for name in distributions.LIKELIHOOD_CONVENTIONS:
      self.assertEqual(distributions.check_likelihood_convention(name), name)
    with self.assertRaisesRegex(errors.ConfigError, 'likelihood_convention'):
      distributions.check_likelihood_convention('unit')

  def test_bernoulli_unchanged(self):
    logits = np.random.default_rng(20).normal(size=(2, 3, 3, 1)).astype(np.float32)
    np.testing.assert_array_equal(from_unit_scale('bernoulli', logits, 1, 10), logits)

  def test_logistic_tiling_nll_is_the_unit_scale_one(self):
    rng = np.random.default_rng(21)
    shape = (2, 3, 4, 3)
    k = random_bins(rng, shape)
    mean = rng.uniform(-0.1, 1.1, size=shape)
    near = rng.uniform(size=shape) < 0.5
    mean[near] = k[near] / 255.0 + rng.normal(scale=0.01, size=near.sum())
    # Above our floor, MIN_LOG_SCALE - log 2 on [0, 1].
    log_scale = rng.uniform(-6.0, 0.0, size=shape)
    unit = np.concatenate([mean, log_scale], -1).astype(np.float32)
    converted = from_unit_scale('logistic', unit, 3, 1)
    expected = -np.sum(np.log(ref_unit_bin_probs(k, unit[..., :3], unit[..., 3:])), axis=(1, 2, 3))
    got = nll('logistic', converted, (k / 255.0).astype(np.float32), 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(
      mean_image('logistic', converted, 1), np.clip(unit[..., :3], 0, 1), atol=1e-6
    )

  @parameterized.parameters(1, 3)
  def test_mixture_tiling_nll_is_the_unit_scale_one(self, channels):
    rng = np.random.default_rng(22)
    mixtures = 3
    k = random_bins(rng, (2, 3, 4, channels))
    # Log-scales below their floor of -7 on [0, 1] too.
    unit = random_unit_mixture_params(rng, k.shape[:3], channels, mixtures, (-8.0, -1.0))
    converted = from_unit_scale('mixture_logistic', unit, channels, mixtures)
    expected = ref_tiling_mixture_nll(unit, k, mixtures)
    got = nll('mixture_logistic', converted, (k / 255.0).astype(np.float32), mixtures)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_mixture_mean_image_couples_on_unit_values(self):
    rng = np.random.default_rng(23)
    mixtures = 2
    unit = random_unit_mixture_params(rng, (1, 4, 4), 3, mixtures, (-4.0, -1.0))
    got = mean_image('mixture_logistic', from_unit_scale('mixture_logistic', unit, 3, mixtures), 2)
    best = np.argmax(unit[..., :mixtures], axis=-1)
    field = lambda c, f: np.take_along_axis(
      np.stack([mixture_field(unit, m, c, f, 3, mixtures) for m in range(mixtures)], -1),
      best[..., None],
      axis=-1,
    )[..., 0]
    x0 = np.clip(field(0, 0), 0, 1)
    x1 = np.clip(field(1, 0) + np.tanh(field(0, 2)) * x0, 0, 1)
    x2 = np.clip(field(2, 0) + np.tanh(field(1, 2)) * x0 + np.tanh(field(2, 2)) * x1, 0, 1)
    np.testing.assert_allclose(got, np.stack([x0, x1, x2], -1), atol=2e-6)


def authors_nll_of_unit(likelihood, unit, x, channels, num_mixtures):
  """authors_nll of the authors' [0, 1]-scale outputs, through from_unit_scale."""
  converted = from_unit_scale(likelihood, unit, channels, num_mixtures)
  return authors_nll(likelihood, converted, x, num_mixtures)


def one_subpixel(*values):
  """Hand cases: each tuple of per-sub-pixel values -> float32 [N, 1, 1, len(tuple)]."""
  return np.float32(values).reshape(len(values), 1, 1, -1)


class AuthorsNllTest(parameterized.TestCase):
  """authors_nll against their formulas, written out in NumPy (float64)."""

  def test_logistic_matches_numpy(self):
    rng = np.random.default_rng(30)
    n = 3000
    k = random_bins(rng, n)
    k[rng.uniform(size=n) < 0.05] = 254
    x = k / 255.0
    log_scale = rng.uniform(-9.0, -4.0, size=n)
    log_scale[rng.uniform(size=n) < 0.05] = -20.0  # Scale floored at 1e-7.
    # Means within a few scales of x and scales up to a few bins, where float32
    # differences of CDFs keep their precision: theirs cancel for wider scales or
    # bins further out (the hand cases below take the clamps).
    mean = x + np.exp(log_scale) * rng.uniform(-3.0, 3.0, size=n)
    unit = np.stack([mean, log_scale], -1).astype(np.float32).reshape(n, 1, 1, 2)
    x32 = x.astype(np.float32).reshape(n, 1, 1, 1)
    expected = -ref_authors_logistic_log_probs(x32[:, 0, 0, 0], unit[:, 0, 0, 0], unit[:, 0, 0, 1])
    got = authors_nll_of_unit('logistic', unit, x32, 1, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(
    # (bin k, mean and log-scale on [0, 1], expected nll). t = 0.5/256 / 0.01.
    (0, 0.0, np.log(0.01), -np.log(special.expit(0.1953125))),  # Lower tail up to 0.5/256.
    (255, 1.0, np.log(0.01), -np.log(special.expit(0.1953125))),  # Upper tail.
    (254, 254 / 255, np.log(0.01), -np.log(special.expit(0.1953125))),  # 254 > 254/256: a tail.
    (253, 253 / 255, np.log(0.01), -np.log(np.tanh(0.1953125 / 2))),  # Interior, 2 t wide.
    (1, 1 / 255, np.log(0.01), -np.log(np.tanh(0.1953125 / 2))),  # 1/255 > 1/256: interior.
    (128, 128 / 255, -30.0, 0.0),  # Scale floored at 1e-7: the whole mass in the bin.
    (128, 0.6, -30.0, -np.log(1e-7)),  # Mass 0, floored at 1e-7.
    (128, 0.5, 100.0, -np.log(1e-7)),  # Log-scale capped at 80: mass ~ 1e-37, floored.
  )
  def test_logistic_hand_cases(self, k, mean, log_scale, expected):
    got = authors_nll_of_unit(
      'logistic', one_subpixel((mean, log_scale)), one_subpixel(k / 255), 1, 1
    )
    np.testing.assert_allclose(got, [expected], rtol=1e-5, atol=1e-6)

  @parameterized.parameters(1, 3)
  def test_mixture_matches_numpy(self, channels):
    rng = np.random.default_rng(31)
    mixtures = 3
    k = random_bins(rng, (3, 4, 4, channels))
    unit = random_unit_mixture_params(rng, k.shape[:3], channels, mixtures, (-9.0, 0.0))
    x = (k / 255.0).astype(np.float32)
    expected = ref_authors_mixture_nll(unit, x, mixtures)
    got = authors_nll_of_unit('mixture_logistic', unit, x, channels, mixtures)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  @parameterized.parameters(
    # (bin k, mean and log-scale on [0, 1]) of one grey component.
    (128, 0.0, -5.0),  # Mass ~ e^-74 <= 1e-5: log density + log(1/255).
    (128, 128 / 255, -20.0),  # Log-scale floored at -7.
    (0, 0.3, -3.0),  # Lower tail, up to 0.5/255.
    (255, 0.3, -3.0),  # Upper tail, from 1 - 0.5/255.
    (254, 254 / 255, -3.0),  # Interior: these bins tile.
  )
  def test_mixture_hand_cases(self, k, mean, log_scale):
    x, half = k / 255.0, 0.5 / 255.0
    scale = np.exp(max(log_scale, -7.0))
    if k == 0:
      log_p = stats.logistic.logcdf(half, mean, scale)
    elif k == 255:
      log_p = stats.logistic.logsf(1.0 - half, mean, scale)
    elif mean == 0.0:
      log_p = stats.logistic.logpdf(x, mean, scale) + np.log(1 / 255)
    else:  # Centred on the bin.
      log_p = np.log(np.tanh(half / scale / 2))
    unit = one_subpixel((0.0, mean, log_scale))  # [logit, mean, log-scale], M = 1.
    got = authors_nll_of_unit('mixture_logistic', unit, one_subpixel(x), 1, 1)
    np.testing.assert_allclose(got, [-log_p], rtol=1e-5)

  def test_mixture_couples_on_unit_values(self):
    x = np.float64([40, 200, 90]) / 255.0
    coeffs = np.float64([0.5, -0.3, 0.8])
    # Raw means making the coupled means x: m1 + c0 x0 = x1, m2 + c1 x0 + c2 x1 = x2.
    means = [x[0], x[1] - coeffs[0] * x[0], x[2] - coeffs[1] * x[0] - coeffs[2] * x[1]]
    log_scale = -4.0
    unit = [0.0]  # One component's logit, then (mean, log-scale, raw coefficient) per channel.
    for c in range(3):
      unit += [means[c], log_scale, np.arctanh(coeffs[c])]
    got = authors_nll_of_unit('mixture_logistic', one_subpixel(unit), one_subpixel(x), 3, 1)
    each = np.log(np.tanh(0.5 / 255.0 / np.exp(log_scale) / 2))
    np.testing.assert_allclose(got, [-3 * each], rtol=1e-5)

  @parameterized.parameters(
    # (logit, x, expected): torch's binary_cross_entropy of sigmoid(logit).
    (30.0, 0.0, 100.0),  # sigmoid rounds to 1: log 0 clamped at -100 (bernoulli_nll: 30).
    (30.0, 1.0, 0.0),
    (-30.0, 1.0, 30.0),
    (-120.0, 1.0, 100.0),
    (5.0, 0.0, np.logaddexp(0.0, 5.0)),
    (-2.0, 1.0, np.logaddexp(0.0, 2.0)),
  )
  def test_bernoulli_is_torch_binary_cross_entropy(self, logit, x, expected):
    logits, x = one_subpixel(logit), one_subpixel(x)
    got, grad = jax.jit(jax.value_and_grad(lambda a: authors_nll('bernoulli', a, x, 1)[0]))(logits)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # torch's gradient: p - x, or 0 where the float32 sigmoid rounded to 0 or 1.
    p = special.expit(np.float64(logit))
    want = 0.0 if special.expit(np.float32(logit)) in (0.0, 1.0) else p - x[0, 0, 0, 0]
    np.testing.assert_allclose(grad[0, 0, 0, 0], want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(('bernoulli', 1, 1), ('logistic', 3, 1), ('mixture_logistic', 3, 2))
  def test_gradients_finite_at_extremes(self, likelihood, channels, mixtures):
    rng = np.random.default_rng(32)
    p = distributions.num_outputs(likelihood, channels, mixtures)
    params = (rng.normal(size=(2, 4, 4, p)) * rng.choice([1.0, 40.0, 200.0], size=p)).astype(
      np.float32
    )
    x = random_bins(rng, (2, 4, 4, channels)) / 255.0
    if likelihood == 'bernoulli':
      x = np.round(x)
    x = x.astype(np.float32)
    value, grad = jax.jit(
      jax.value_and_grad(lambda a: jnp.sum(authors_nll(likelihood, a, x, mixtures)))
    )(params)
    self.assertTrue(np.isfinite(value))
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
