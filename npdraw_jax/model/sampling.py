"""Ancestral sampling from the prior (docs/model.md, section 4).

`make_sampler` keeps a key/value cache and the running canvas: each step runs
the Transformer on one token and pastes one part, all inside one `lax.scan`
(the authors' prior's class token enters the cache once, before the scan).
`make_naive_sampler` re-renders every canvas and re-runs the whole Transformer
at each step, as the authors' code does; it is the O(T^2) baseline the
benchmarks compare against and draws exactly the same samples.
"""

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model.nets import prior as prior_lib


class Samples(NamedTuple):
  """Prior samples; B samples of T steps.

  Attributes:
    pres: [B, T] bool.
    where: [B, T] int32.
    what: [B, T] int32.
    canvases: [B, T, Hc, Wc, C] canvas after each step.
    logits: the prior's logits at each step, {'pres': [B, T], 'where': [B, T, L],
      'what': [B, T, K]}, before temperature and top-k.
  """

  pres: jax.Array
  where: jax.Array
  what: jax.Array
  canvases: jax.Array
  logits: dict[str, jax.Array]


def _top_k(logits: jax.Array, k: int) -> jax.Array:
  """Logits outside the k largest set to -inf; k = 0 keeps all."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def sample_step(
  key: jax.Array, logits: dict[str, jax.Array], temperature: float, top_k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws (pres, where, what) of one step from its logits [B], [B, L], [B, K]."""
  key_pres, key_where, key_what = jax.random.split(key, 3)
  pres = jax.random.bernoulli(key_pres, jax.nn.sigmoid(logits['pres'] / temperature))
  where = jax.random.categorical(key_where, _top_k(logits['where'] / temperature, top_k))
  what = jax.random.categorical(key_what, _top_k(logits['what'] / temperature, top_k))
  return pres, where.astype(jnp.int32), what.astype(jnp.int32)


def _draw(grid, bank, canvas, location_map, pres, where, what, history):
  """Pastes one part per sample onto running canvases [B, H, W, C], and what the
  prior's history adds for the step onto the location maps (canvas.sampled_boxes)."""
  part = canvas_lib.paste(grid, jnp.take(bank, what, axis=0), where)
  box = canvas_lib.sampled_boxes(grid, pres, where, history, bank.dtype)
  drawn = pres[:, None, None, None]
  return jnp.where(drawn, jnp.maximum(canvas, part), canvas), jnp.maximum(location_map, box)


def make_sampler(
  model: prior_lib.Prior, grid: canvas_lib.Grid, batch_size: int, top_k: int = 0
) -> Callable[..., Samples]:
  """A jitted cached sampler: (params, bank [K, p, p, C], key, temperature) -> Samples."""
  decoder = model.clone(decode=True)
  num_steps = model.num_steps

  @jax.jit
  def sample(params, bank, key, temperature=1.0):
    chex.assert_shape(bank, (model.num_parts, grid.patch_size, grid.patch_size, None))
    side, channels = grid.canvas_size, bank.shape[-1]
    canvas = jnp.zeros((batch_size, side, side, channels), bank.dtype)
    location_map = jnp.zeros((batch_size, side, side, 1), bank.dtype)
    cache = prior_lib.initial_cache(model, params, batch_size, (side, side, channels))

    def step(carry, t):
      cache, canvas, location_map = carry
      logits, updated = decoder.apply(
        {'params': params, 'cache': cache},
        canvas[:, None],
        location_map[:, None],
        t[None],
        mutable=['cache'],
      )
      logits = jax.tree.map(lambda x: x[:, 0], logits)
      pres, where, what = sample_step(jax.random.fold_in(key, t), logits, temperature, top_k)
      canvas, location_map = _draw(
        grid, bank, canvas, location_map, pres, where, what, model.history
      )
      return (updated['cache'], canvas, location_map), (pres, where, what, canvas, logits)

    _, outputs = jax.lax.scan(step, (cache, canvas, location_map), jnp.arange(num_steps))
    # Scan stacks along axis 0; samples are batch-major.
    pres, where, what, canvases, logits = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), outputs)
    return Samples(pres, where, what, canvases, logits)

  return sample


def make_naive_sampler(
  model: prior_lib.Prior, grid: canvas_lib.Grid, batch_size: int, top_k: int = 0
) -> Callable[..., Samples]:
  """The O(T^2) baseline with make_sampler's signature and random draws."""
  num_steps = model.num_steps

  @jax.jit
  def sample(params, bank, key, temperature=1.0):
    zeros = jnp.zeros((batch_size, num_steps), jnp.int32)
    init = (zeros.astype(bool), zeros, zeros)

    def step(t, sequence):
      pres, where, what = sequence
      # Steps >= t are undrawn, so the canvases before steps <= t are exact.
      canvases, maps = canvas_lib.render_sampled_steps(grid, bank, pres, where, what, model.history)
      logits = model.apply(
        {'params': params}, *canvas_lib.states_before(canvases, maps), jnp.arange(num_steps)
      )
      logits_t = jax.tree.map(lambda x: x[:, t], logits)
      drawn = sample_step(jax.random.fold_in(key, t), logits_t, temperature, top_k)
      return tuple(s.at[:, t].set(d) for s, d in zip(sequence, drawn, strict=True))

    pres, where, what = jax.lax.fori_loop(0, num_steps, step, init)
    canvases, maps = canvas_lib.render_sampled_steps(grid, bank, pres, where, what, model.history)
    logits = model.apply(
      {'params': params}, *canvas_lib.states_before(canvases, maps), jnp.arange(num_steps)
    )
    return Samples(pres, where, what, canvases, logits)

  return sample
