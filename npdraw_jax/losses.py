"""Log-likelihoods and training objectives."""

import chex
import jax
import jax.numpy as jnp


def _log_prob_of(logits: jax.Array, index: jax.Array) -> jax.Array:
  """log softmax(logits)[index] along the last axis."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_probs, index[..., None].astype(jnp.int32), axis=-1)[..., 0]


def prior_step_log_prob(
  logits: dict[str, jax.Array], pres: jax.Array, where: jax.Array, what: jax.Array
) -> jax.Array:
  """log p(step t | history) of each step (spec section 4).

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
  pres_logit = logits['pres']
  log_pres = jnp.where(pres, jax.nn.log_sigmoid(pres_logit), jax.nn.log_sigmoid(-pres_logit))
  drawn = _log_prob_of(logits['where'], where) + _log_prob_of(logits['what'], what)
  return log_pres + jnp.where(pres, drawn, 0.0)


def prior_sequence_log_prob(logits, pres, where, what) -> jax.Array:
  """log p(z) of whole sequences, [...] (the sum of prior_step_log_prob)."""
  return jnp.sum(prior_step_log_prob(logits, pres, where, what), axis=-1)
