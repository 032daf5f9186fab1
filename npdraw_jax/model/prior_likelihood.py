"""The prior's log-likelihood of step sequences (docs/model.md, section 4); the bound
built on it is in npdraw_jax/model/bound.py."""

import chex
import jax
import jax.numpy as jnp

from npdraw_jax.model import distributions


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
