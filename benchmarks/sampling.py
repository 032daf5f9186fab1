"""Cached (KV) prior sampler against the naive O(T^2) one.

With randomly initialised prior parameters and a random part bank, both
samplers draw one batch from the same key and must agree; the timed calls
then alternate cached / naive in this one process, so machine noise hits both
alike. The naive sampler stops repeating once its timed calls would pass a
time budget.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from benchmarks import timing
from npdraw_jax.model import canvas, sampling
from npdraw_jax.model.nets import prior as prior_lib


def _setup(config, seed: int = 0):
  """Model, grid, random params and random bank of a configuration's prior."""
  grid = canvas.grid_from_config(config)
  model = prior_lib.make_prior(config, grid.num_locations)
  side, channels, steps = config.data.canvas_size, config.data.channels, config.model.T
  init_key, bank_key = jax.random.split(jax.random.key(seed))
  history = jnp.zeros((1, steps, side, side, channels))
  params = jax.jit(model.init)(init_key, history, history[..., :1], jnp.arange(steps))['params']
  patch = config.model.patch_size
  bank = jax.random.uniform(bank_key, (config.model.K, patch, patch, channels))
  return model, grid, params, bank


def _check_same_samples(name: str, cached: sampling.Samples, naive: sampling.Samples) -> None:
  """Raises unless both samplers drew the same steps."""
  for field in ('where', 'pres', 'what'):
    a, b = np.asarray(getattr(cached, field)), np.asarray(getattr(naive, field))
    if not np.array_equal(a, b):
      raise AssertionError(
        f'{name}: cached and naive samplers drew different {field!r} from the same key '
        f'({int(np.sum(a != b))} of {a.size} entries differ; first at '
        f'{np.argwhere(a != b)[0].tolist()}).'
      )


def measure(name: str, get_config, batch: int, repeats: int, naive_budget_s: float) -> dict:
  """Compiles both samplers, checks they agree, then times them alternately."""
  config = get_config()
  model, grid, params, bank = _setup(config)
  key = jax.random.key(1)
  samplers = {
    'cached': sampling.make_sampler(model, grid, batch),
    'naive': sampling.make_naive_sampler(model, grid, batch),
  }
  first = {}
  for kind, sampler in samplers.items():
    logging.info('%s: compiling the %s sampler.', name, kind)
    first[kind] = timing.time_call(sampler, params, bank, key, repeats=0)
  _check_same_samples(name, first['cached']['output'], first['naive']['output'])
  drawn = np.asarray(first['cached']['output'].pres).sum(axis=1)
  logging.info('%s: samples agree; %.1f parts drawn per sample.', name, drawn.mean())

  seconds = timing.alternate(
    {kind: functools.partial(sampler, params, bank, key) for kind, sampler in samplers.items()},
    repeats,
    naive_budget_s,
  )
  logging.info('%s: %s', name, seconds)
  return {
    'name': name,
    'T': config.model.T,
    'L': grid.num_locations,
    'K': config.model.K,
    'canvas': f'{grid.canvas_size}x{grid.canvas_size}x{config.data.channels}',
    'params': sum(x.size for x in jax.tree.leaves(params)),
    'parts_drawn': float(drawn.mean()),
    'compile_s': {k: v['compile_s'] for k, v in first.items()},
    'seconds': seconds,
  }


def table(rows: list[dict], batch: int, repeats: int) -> list[str]:
  """Markdown for the measured configurations."""
  lines = [
    f'Prior sampling, batch {batch}, random prior params and part bank. Calls alternate '
    'cached / naive in one process; `where`, `pres` and `what` of the two samplers were '
    'checked equal for the same key. "first call" = compile + one run.',
    '',
    '| prior | canvas | T = L | K | params | sampler | first call (s) | timed runs | '
    's / batch (median) | images/s |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    for kind in ('cached', 'naive'):
      median = float(np.median(row['seconds'][kind]))
      lines.append(
        f'| {row["name"]} | {row["canvas"]} | {row["T"]} | {row["K"]} | '
        f'{row["params"] / 1e6:.2f}M | {kind} | {row["compile_s"][kind]:.1f} | '
        f'{len(row["seconds"][kind])} | {median:.3f} | {timing.rate(batch, median)} |'
      )
  for row in rows:
    if len(row['seconds']['naive']) < repeats:
      lines += [
        '',
        f'The naive sampler at {row["name"]} ran {len(row["seconds"]["naive"])} timed '
        f'call(s) instead of {repeats}: its time budget stopped it.',
      ]
  lines += ['', '| prior | speed-up naive / cached (median s / batch) |', '|---|---|']
  for row in rows:
    ratio = np.median(row['seconds']['naive']) / np.median(row['seconds']['cached'])
    lines.append(f'| {row["name"]} (T = {row["T"]}) | **{ratio:.1f}x** |')
  return lines
