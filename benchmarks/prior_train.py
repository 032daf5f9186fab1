"""Stage-1 (prior) train-step throughput.

The train state is built as train_prior.train_and_evaluate builds it
(make_init_fn: TrainState.create with its optax chain, replicated over the
mesh), the jitted step is train_prior.make_steps', and the batch is random
parse-like sequences (pres, where, what of shape [B, T]) with a random part
bank. The first step (compile + run) is reported apart from the median of the
timed steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from benchmarks import timing
from npdraw_jax.infra import sharding, training
from npdraw_jax.model import canvas
from npdraw_jax.model.nets import prior as prior_lib
from npdraw_jax.stages import train_prior


def random_sequences(config, num_locations: int, batch: int, seed: int = 0) -> dict:
  """Parse-like host arrays: pres [B, T] bool, where / what [B, T] int32."""
  rng = np.random.default_rng(seed)
  shape = (batch, config.model.T)
  return {
    'pres': rng.random(shape) < 0.8,
    'where': rng.integers(0, num_locations, shape, dtype=np.int32),
    'what': rng.integers(0, config.model.K, shape, dtype=np.int32),
  }


def measure(name: str, get_config, batch_size: int, steps: int) -> dict:
  """Times train steps of one configuration at one global batch size."""
  config = get_config()
  config.prior.batch_size = batch_size
  p = config.prior
  sharding.check_batch_size(p.batch_size, 'prior.batch_size')
  grid = canvas.grid_from_config(config)
  mesh = sharding.make_mesh()
  model = prior_lib.make_prior(config, grid.num_locations)
  schedule = training.warmup_decay_schedule(p.lr, p.warmup_steps, p.train_steps)
  state = training.init_replicated(train_prior.make_init_fn(config, model, schedule), mesh)
  train_step, _ = train_prior.make_steps(model, grid, mesh, schedule)
  patch, channels = config.model.patch_size, config.data.channels
  bank_host = jax.random.uniform(jax.random.key(1), (config.model.K, patch, patch, channels))
  bank = sharding.replicate(jnp.asarray(bank_host), mesh)
  batch = sharding.to_global(random_sequences(config, grid.num_locations, batch_size), mesh)

  def step():
    # The step donates its state, so each call continues from the last one's.
    nonlocal state
    state, metrics = train_step(state, bank, batch)
    return state, metrics

  logging.info('%s, batch %d: compiling and running %d steps.', name, batch_size, steps + 1)
  timed = timing.time_call(step, repeats=steps)
  nll = float(timed['output'][1]['nll'])
  if not np.isfinite(nll):
    raise FloatingPointError(f'{name}, batch {batch_size}: non-finite NLL {nll}.')
  logging.info('%s, batch %d: %s', name, batch_size, timed['all_s'])
  return {
    'name': name,
    'batch': batch_size,
    'canvas': f'{grid.canvas_size}x{grid.canvas_size}x{channels}',
    'T': config.model.T,
    'K': config.model.K,
    'params': sum(x.size for x in jax.tree.leaves(state.params)),
    'compile_s': timed['compile_s'],
    'median_s': timed['median_s'],
    'all_s': timed['all_s'],
  }


def table(rows: list[dict]) -> list[str]:
  """Markdown for the measured configurations."""
  lines = [
    'Stage-1 prior train step (teacher forcing: render T canvases, Transformer, backward, '
    'Adam), random parse-like sequences. "first step" = compile + one step; then the median '
    'of the timed steps.',
    '',
    '| config | canvas | T = L | K | params | batch | first step (s) | timed steps | '
    's / step (median) | images/s |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["name"]} | {row["canvas"]} | {row["T"]} | {row["K"]} | '
      f'{row["params"] / 1e6:.2f}M | {row["batch"]} | {row["compile_s"]:.1f} | '
      f'{len(row["all_s"])} | {row["median_s"]:.3f} | '
      f'{timing.rate(row["batch"], row["median_s"])} |'
    )
  return lines
