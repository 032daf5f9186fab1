"""The prior's log-likelihood of step sequences (spec section 4), and the
importance-weighted bounds of the evaluation (spec section 8)."""

import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from npdraw_jax import distributions


def prior_step_log_prob(
  logits: dict[str, jax.Array], pres: jax.Array, where: jax.Array, what: jax.Array
) -> jax.Array:
  """log p(step t | history) of each step.

  log Bern(pres_t) + pres_t * (log Cat(where_t) + log Cat(what_t)): the
  location and part of an undrawn step do not count.

  Args:
    logits: {'pres': [..., T], 'where': [..., T, L], 'what': [..., T, K]}.
    pres: [..., T] bool.
    where: [..., T] int.
    what: [..., T] int.

  Returns:
    [..., T] log-probabilities in nats.
  """
  chex.assert_equal_shape([logits['pres'], pres, where, what])
  drawn = distributions.categorical_log_prob(
    logits['where'], where
  ) + distributions.categorical_log_prob(logits['what'], what)
  return distributions.bernoulli_log_prob(logits['pres'], pres) + jnp.where(pres, drawn, 0.0)


def prior_sequence_log_prob(logits, pres, where, what) -> jax.Array:
  """log p(z) of whole sequences, [...] (the sum of prior_step_log_prob)."""
  return jnp.sum(prior_step_log_prob(logits, pres, where, what), axis=-1)


def importance_weighted_bounds(
  log_weights: Callable[[jax.Array, int], jax.Array],
  key: jax.Array,
  sample_counts: tuple[int, ...],
  chunk_size: int,
) -> dict[str, jax.Array]:
  """Per-example NLL bounds in nats at several S, chunk_size samples at a time.

  One pass draws max(sample_counts) samples; the bound at S uses the first S
  of them, so every S costs no more than the largest (the estimates at
  different S are correlated, each is a valid bound).

  Args:
    log_weights: (key, n) -> [n, B] log p(x, z_s) - log q(z_s | x) of n fresh
      samples z_s ~ q for each of B examples.
    key: PRNG key of the samples.
    sample_counts: the values of S.
    chunk_size: samples per call of log_weights; divides max(sample_counts).

  Returns:
    f'nll_iwae_{S}' [B] for each S: -logmeanexp_{s <= S} w_s, the
      importance-weighted bound on -log p(x);
    'elbo' [B]: -mean_s w_s over all samples, the single-sample bound on
      -log p(x) averaged over s.
  """
  counts = tuple(sorted(set(sample_counts)))
  num_samples = counts[-1]
  if counts[0] < 1:
    raise ValueError(f'eval.iwae_samples must be positive, got {sample_counts}.')
  if num_samples % chunk_size:
    raise ValueError(
      f'The largest of eval.iwae_samples, {num_samples}, must be a multiple of '
      f'eval.chunk_size {chunk_size}.'
    )
  keys = jax.random.split(key, num_samples // chunk_size)
  chunks = jax.lax.map(lambda k: log_weights(k, chunk_size), keys)
  log_w = chunks.reshape(num_samples, -1)
  bounds = {f'nll_iwae_{s}': math.log(s) - jax.nn.logsumexp(log_w[:s], axis=0) for s in counts}
  return {**bounds, 'elbo': -jnp.mean(log_w, axis=0)}
