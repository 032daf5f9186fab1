"""The prior's log-likelihood of step sequences (spec section 4), and the
importance-weighted bounds of the evaluation (spec section 8)."""

import math
from collections.abc import Callable
from typing import Any

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
