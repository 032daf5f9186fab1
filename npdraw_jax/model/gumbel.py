"""Relaxed samples of discrete latents (docs/model.md, section 5); the key is an argument.

- `gumbel_softmax`: softmax((logits + g) / tau), g standard Gumbel noise; its
  argmax is an exact categorical draw, and as tau -> 0 it tends to that one-hot.
- `straight_through_one_hot`: the one-hot of the argmax forward, the soft
  sample's gradient backward.
- `bernoulli`: a hard draw without gradient.
- `relaxed_bernoulli`: the binary Concrete sigmoid((logit + L) / tau), L
  standard logistic noise (the difference of two Gumbels); it exceeds 1/2
  exactly when the hard draw with the same key is 1, at any tau.

Each has a `*_with_noise` twin that takes the noise instead of the key, so
that the same noise can be given to another implementation (the equivalence
harness against the authors' code); the key versions draw it and call them.
"""

import chex
import jax
import jax.numpy as jnp


def straight_through_one_hot(soft: jax.Array) -> jax.Array:
  """One-hot of argmax(soft) forward, d soft backward: [..., K] -> [..., K]."""
  chex.assert_axis_dimension_gteq(soft, -1, 1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  # Parenthesised so the forward value is exactly `hard`: (hard + soft) - soft can round.
  return hard + (soft - jax.lax.stop_gradient(soft))


def gumbel_softmax(
  key: jax.Array, logits: jax.Array, tau, straight_through: bool = False
) -> jax.Array:
  """A Gumbel-softmax sample at temperature tau: logits [..., K] -> [..., K] on the simplex.

  Args:
    key: PRNG key.
    logits: [..., K] unnormalised log-probabilities.
    tau: temperature > 0 (a float or a traced scalar).
    straight_through: return the hard one-hot forward, the soft gradient backward.

  Returns:
    [..., K] float32.
  """
  noise = jax.random.gumbel(key, jnp.shape(logits), jnp.float32)
  return gumbel_softmax_with_noise(logits, noise, tau, straight_through)


def gumbel_softmax_with_noise(
  logits: jax.Array, noise: jax.Array, tau, straight_through: bool = False
) -> jax.Array:
  """gumbel_softmax given its standard Gumbel noise [..., K] instead of a key."""
  chex.assert_axis_dimension_gteq(logits, -1, 1)
  chex.assert_equal_shape([logits, noise])
  logits = jnp.asarray(logits, jnp.float32)
  soft = jax.nn.softmax((logits + noise) / tau, axis=-1)
  return straight_through_one_hot(soft) if straight_through else soft


def bernoulli(key: jax.Array, logit: jax.Array) -> jax.Array:
  """A hard draw in {0., 1.} with P(1) = sigmoid(logit), no gradient; same shape as logit."""
  return bernoulli_with_noise(logit, jax.random.logistic(key, jnp.shape(logit), jnp.float32))


def bernoulli_with_noise(logit: jax.Array, noise: jax.Array) -> jax.Array:
  """bernoulli given its standard logistic noise instead of a key."""
  chex.assert_equal_shape([logit, noise])
  logit = jnp.asarray(logit, jnp.float32)
  # logit + L > 0 has probability sigmoid(logit) without forming sigmoid, so it
  # stays exact for large |logit|, and it matches relaxed_bernoulli(key, ...) > 1/2.
  return jax.lax.stop_gradient((logit + noise > 0).astype(jnp.float32))


def relaxed_bernoulli(
  key: jax.Array, logit: jax.Array, tau, straight_through: bool = False
) -> jax.Array:
  """A binary Concrete sample sigmoid((logit + L) / tau) in (0, 1); same shape as logit.

  Args:
    key: PRNG key.
    logit: [...] logits of P(1).
    tau: temperature > 0.
    straight_through: return the hard 0/1 value (sample > 1/2) forward, the
      relaxed sample's gradient backward.

  Returns:
    [...] float32; in float32 a sample saturates to exactly 0 or 1 once
    |logit + L| / tau exceeds about 17 (upper) or 88 (lower).
  """
  noise = jax.random.logistic(key, jnp.shape(logit), jnp.float32)
  return relaxed_bernoulli_with_noise(logit, noise, tau, straight_through)


def relaxed_bernoulli_with_noise(
  logit: jax.Array, noise: jax.Array, tau, straight_through: bool = False
) -> jax.Array:
  """relaxed_bernoulli given its standard logistic noise instead of a key."""
  chex.assert_equal_shape([logit, noise])
  logit = jnp.asarray(logit, jnp.float32)
  soft = jax.nn.sigmoid((logit + noise) / tau)
  if not straight_through:
    return soft
  # Decided on the argument, not on soft > 1/2, so it agrees with `bernoulli` exactly.
  hard = (logit + noise > 0).astype(jnp.float32)
  return hard + (soft - jax.lax.stop_gradient(soft))
