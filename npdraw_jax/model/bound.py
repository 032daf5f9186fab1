"""The importance-weighted bound on -log p(x), in one place (docs/model.md, "The bound").

From the math up:
- `bounds_from_log_weights`: -logmeanexp of log-weights at each S, and the ELBO;
- `hard_sample`, `score_hard_samples`, `log_importance_weights`, `iwae_bounds`:
  S hard samples z_s ~ q(z | x), scored by the prior, the decoder and q, and
  the bounds at each S with the NP-DRAW authors' estimate (not a bound);
- `summarise`: per-image bounds as means, standard errors and bits per dimension.
stages/scoring.py runs these over a whole split, jitted and sharded, for the
eval stage, stage 2's held-out check (which picks the best checkpoint) and the
baseline VAE.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from npdraw_jax import errors
from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import distributions, npdraw, prior_likelihood


def draw_log_weights(
  log_weights: Callable[[jax.Array, int], Any], key: jax.Array, num_samples: int, chunk_size: int
):
  """num_samples draws of log_weights, chunk_size per call: leaves [num_samples, B].

  Args:
    log_weights: (key, n) -> a pytree of [n, B] log-weights of n fresh samples
      z_s ~ q for each of B examples.
    key: PRNG key of the samples.
    num_samples: samples in all; a multiple of chunk_size.
    chunk_size: samples per call.
  """
  if num_samples < 1 or num_samples % chunk_size:
    raise ValueError(
      f'The samples drawn, {num_samples}, must be positive and a multiple of eval.chunk_size '
      f'{chunk_size}.'
    )
  keys = jax.random.split(key, num_samples // chunk_size)
  chunks = jax.lax.map(lambda k: log_weights(k, chunk_size), keys)
  return jax.tree.map(lambda x: x.reshape(num_samples, *x.shape[2:]), chunks)


def negative_log_mean_exp(log_w: jax.Array, num_samples: int) -> jax.Array:
  """-log((1 / S) sum_{s <= S} exp(log_w[s])) over the first S rows of [N, B]."""
  return math.log(num_samples) - jax.nn.logsumexp(log_w[:num_samples], axis=0)


def bounds_from_log_weights(log_w: jax.Array, sample_counts: tuple[int, ...]) -> dict:
  """Per-example NLL bounds in nats from [N, B] log p(x, z_s) - log q(z_s | x).

  The bound at S uses the first S samples, so every S costs no more than the
  largest (the estimates at different S are correlated, each is a valid bound).

  Returns:
    f'nll_iwae_{S}' [B] for each S: -logmeanexp_{s <= S} w_s, the
      importance-weighted bound on -log p(x);
    'elbo' [B]: -mean_s w_s over all N samples, the single-sample bound on
      -log p(x) averaged over s.
  """
  counts = tuple(sorted(set(sample_counts)))
  if counts[0] < 1 or counts[-1] > log_w.shape[0]:
    raise ValueError(f'eval.iwae_samples must lie in 1..{log_w.shape[0]}, got {sample_counts}.')
  bounds = {f'nll_iwae_{s}': negative_log_mean_exp(log_w, s) for s in counts}
  return {**bounds, 'elbo': -jnp.mean(log_w, axis=0)}


def importance_weighted_bounds(
  log_weights: Callable[[jax.Array, int], jax.Array],
  key: jax.Array,
  sample_counts: tuple[int, ...],
  chunk_size: int,
) -> dict[str, jax.Array]:
  """bounds_from_log_weights of max(sample_counts) samples, chunk_size at a time.

  Args:
    log_weights: (key, n) -> [n, B] log p(x, z_s) - log q(z_s | x) of n fresh
      samples z_s ~ q for each of B examples.
    key: PRNG key of the samples.
    sample_counts: the values of S.
    chunk_size: samples per call of log_weights; divides max(sample_counts).
  """
  log_w = draw_log_weights(log_weights, key, max(sample_counts), chunk_size)
  return bounds_from_log_weights(log_w, sample_counts)


def hard_sample(key: jax.Array, q: dict, num_samples: int):
  """S hard samples of q: (pres, where, what) [S, B, T] and their log q [S, B].

  The location and part of an undrawn step are not part of z (the prior does
  not score them either), so they are marginalised out of log q.
  """
  k_pres, k_where, k_what = jax.random.split(key, 3)
  shape = (num_samples, *q['pres'].shape)
  pres = jax.random.bernoulli(k_pres, jax.nn.sigmoid(q['pres']), shape)
  where = jax.random.categorical(k_where, q['where'], shape=shape).astype(jnp.int32)
  what = jax.random.categorical(k_what, q['what'], shape=shape).astype(jnp.int32)
  q_per_sample = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_samples, *x.shape)), q)
  return (pres, where, what), prior_likelihood.prior_sequence_log_prob(
    q_per_sample, pres, where, what
  )


class ScoredSamples(NamedTuple):
  """S hard samples z_s ~ q(z | x) of B images, scored by the model.

  Per-sample arrays are flattened sample-major: row s * B + b is sample s of image b.
  """

  pres: jax.Array  # [S * B, T] bool.
  log_q: jax.Array  # [S, B] log q(z_s | x).
  log_pz: jax.Array  # [S, B] log p(z_s).
  log_px: jax.Array  # [S, B] log p(x | z_s), the proper (tiling) likelihood.
  # For the authors' estimate, when asked for: the prior on the history their
  # KL reads, leaves [S * B, T, ...], and log p(x | z_s) [S, B] under the
  # likelihood stage 2 trains on (npdraw.reconstruction_loss).
  prior_logits_authors: dict | None
  log_px_trained: jax.Array | None


def score_hard_samples(
  model: npdraw.NPDraw,
  variables: dict,
  bank: jax.Array,
  q: dict,
  images: jax.Array,
  key,
  num_samples,
  authors: bool = False,
) -> ScoredSamples:
  """Draws S hard samples of q (logits of images [B, H, W, C]) and scores them.

  log p(z_s) reads the history as the model generates it
  (canvas.render_sampled_steps): the location and part of an undrawn step are
  neither drawn by the prior nor part of z, so they must not shape it. With
  `authors`, also what the authors' estimate needs: the prior on the history
  their KL reads (every step's box at q's location under the 'every_step'
  history; the same history otherwise), and log p(x | z_s) under the
  likelihood stage 2 trains on.
  """
  (pres, where, what), log_q = hard_sample(key, q, num_samples)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  steps = jnp.arange(model.prior.num_steps)
  prior = lambda states: model.prior.apply(
    {'params': variables['params']['prior']}, *map(flat, states), steps
  )
  render_args = (model.grid, bank, pres, where, what, model.prior.history)
  canvases, maps = canvas_lib.render_sampled_steps(*render_args)
  p = prior(canvas_lib.states_before(canvases, maps))
  log_pz = prior_likelihood.prior_sequence_log_prob(p, flat(pres), flat(where), flat(what))
  out, _ = npdraw.decode(model, variables, flat(canvases[:, :, -1]), train=False)
  repeated = flat(jnp.broadcast_to(images, (num_samples, *images.shape)))
  log_px = -distributions.nll(model.likelihood, out, repeated, model.num_mixtures)
  p_authors = log_px_trained = None
  if authors:
    p_authors = p
    if model.prior.history == 'every_step':
      p_authors = prior(canvas_lib.states_before(*canvas_lib.render_steps(*render_args)))
    trained = log_px
    if model.likelihood_convention == 'authors':
      trained = -npdraw.reconstruction_loss(model, out, repeated)
    log_px_trained = trained.reshape(num_samples, -1)
  return ScoredSamples(
    pres=flat(pres),
    prior_logits_authors=p_authors,
    log_q=log_q,
    log_pz=log_pz.reshape(num_samples, -1),
    log_px=log_px.reshape(num_samples, -1),
    log_px_trained=log_px_trained,
  )


def log_importance_weights(
  model: npdraw.NPDraw,
  variables: dict,
  bank: jax.Array,
  q: dict,
  images: jax.Array,
  key,
  num_samples,
  authors: bool = False,
) -> dict[str, jax.Array]:
  """Log-weights of S hard samples, [S, B] each.

  'iwae': log p(x | z_s) + log p(z_s) - log q(z_s | x); with `authors` also
  'authors': log p(x | z_s) - KL(q || p_s), the stage-2 KL (prior_kl) with p_s
  the prior run on the history of z_s (the NP-DRAW authors' weights, docs/model.md
  section 11), with p(x | z_s) the likelihood stage 2 trains on (theirs under
  the authors' convention).
  """
  scored = score_hard_samples(model, variables, bank, q, images, key, num_samples, authors)
  weights = {'iwae': scored.log_px + scored.log_pz - scored.log_q}
  if authors:
    q_per_sample = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_samples, *x.shape)).reshape(-1, *x.shape[1:]), q
    )
    p = scored.prior_logits_authors
    kl = npdraw.prior_kl(q_per_sample, p, scored.pres.astype(jnp.float32))
    weights['authors'] = scored.log_px_trained - kl.reshape(num_samples, -1)
  return weights


def samples_drawn(sample_counts: tuple[int, ...], authors_samples: int = 0) -> int:
  """How many samples iwae_bounds draws: the bounds and the authors' estimate share them."""
  return max(*sample_counts, authors_samples)


def iwae_bounds(
  model: npdraw.NPDraw,
  variables: dict,
  bank: jax.Array,
  images: jax.Array,
  key: jax.Array,
  sample_counts: tuple[int, ...],
  chunk_size: int,
  authors_samples: int = 0,
) -> dict[str, jax.Array]:
  """Per-image bounds on -log p(x) in nats at each S (bounds_from_log_weights).

  With authors_samples = S_a > 0 also f'nll_authors_{S_a}' [B], the NP-DRAW
  authors' NLL estimate (docs/model.md, section 11): -logmeanexp of their weights
  (log_importance_weights) over the first S_a of the same samples. It is NOT a
  bound on -log p(x) (the KL is not log q(z_s) - log p(z_s) of the sample):
  report it only to compare with the authors' tables. samples_drawn(...)
  samples are drawn, chunk_size per pass, which divides that number.
  """
  q, _ = npdraw.encode(model, variables, images, train=False)
  log_w = draw_log_weights(
    lambda k, n: log_importance_weights(
      model, variables, bank, q, images, k, n, authors=bool(authors_samples)
    ),
    key,
    samples_drawn(sample_counts, authors_samples),
    chunk_size,
  )
  out = bounds_from_log_weights(log_w['iwae'], sample_counts)
  if authors_samples:
    estimate = negative_log_mean_exp(log_w['authors'], authors_samples)
    out[f'nll_authors_{authors_samples}'] = estimate
  return out


def iwae_sample_counts(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """eval.iwae_samples (one S or several) as a sorted tuple."""
  counts = config.eval.iwae_samples
  counts = (counts,) if isinstance(counts, int) else tuple(counts)
  if not counts or min(counts) < 1:
    raise ValueError(f'eval.iwae_samples must hold positive sample counts, got {counts}.')
  return tuple(sorted(set(counts)))


def sample_chunk(num_samples: int, chunk_size: int, field: str) -> int:
  """Samples per compiled pass when drawing num_samples (the config field
  `field`): min(eval.chunk_size, num_samples), which must divide it."""
  chunk = min(chunk_size, num_samples)
  if num_samples < 1 or chunk < 1 or num_samples % chunk:
    raise errors.ConfigError(
      f'{field} = {num_samples} must be positive and a multiple of eval.chunk_size '
      f'= {chunk_size} when larger than it.'
    )
  return chunk


def summarise(per_image: dict[str, np.ndarray], num_dims: int, is_8bit: bool) -> dict[str, float]:
  """Means over test images, standard errors of the means, and bits/dim.

  per_image holds 'elbo' and 'nll_iwae_{S}' for one or more S; the summary adds
  'nll_iwae' (and 'bits_per_dim' for 8-bit data), the bound at the largest S,
  'iwae_samples', that S, and 'test_images', the number of images.
  """
  largest = max(int(name.rsplit('_', 1)[1]) for name in per_image if name.startswith('nll_iwae_'))
  per_image = {**per_image, 'nll_iwae': per_image[f'nll_iwae_{largest}']}
  out = {}
  for name, values in per_image.items():
    out[name] = float(np.mean(values))
    out[f'{name}_stderr'] = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    if is_8bit and name.startswith('nll_iwae'):
      out[name.replace('nll_iwae', 'bits_per_dim')] = out[name] / (num_dims * math.log(2))
  out['iwae_samples'] = largest
  out['test_images'] = len(per_image['nll_iwae'])
  return out
