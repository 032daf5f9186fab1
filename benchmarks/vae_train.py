"""Stage-2 (encoder + decoder against the frozen prior) train-step throughput.

  python -m benchmarks.vae_train [--steps=3]

At the MNIST and CelebA configurations, each with batch 64 and its reference
vae.batch_size: the state is built as train_vae builds it, the step is
train_vae.make_train_step, the batch random images with random parses.
Compile time (lower + compile) is reported apart from the first run of the
compiled step and the median of the next --steps; memory is XLA's account
of the compiled step (arguments, outputs and temporaries), plus the device's
own peak where the backend reports one.
Appends to benchmarks/RESULTS.md.
"""

import time

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import results, timing
from configs import celeba, mnist
from npdraw_jax import npdraw, sharding, train_lib, train_vae

_STEPS = flags.DEFINE_integer('steps', 3, 'Timed train steps after the first one.')
_ONLY = flags.DEFINE_list('only', ['MNIST', 'CelebA'], 'Configurations to measure.')

CONFIGS = {'MNIST': mnist.get_config, 'CelebA': celeba.get_config}
SMALL_BATCH = 64


def random_batch(config, num_locations: int, batch: int) -> dict:
  """Images in [0, 1] (binary for Bernoulli data) and parse-like sequences."""
  rng = np.random.default_rng(0)
  side, channels, steps = config.data.image_size, config.data.channels, config.model.T
  images = rng.random((batch, side, side, channels), dtype=np.float32)
  if config.model.likelihood == 'bernoulli':
    images = (images < 0.2).astype(np.float32)
  else:
    images = np.round(images * 255) / 255
  return {
    'image': images,
    'pres': rng.random((batch, steps)) < 0.8,
    'where': rng.integers(0, num_locations, (batch, steps), dtype=np.int32),
    'what': rng.integers(0, config.model.K, (batch, steps), dtype=np.int32),
  }


def measure(name: str, get_config, batch_size: int, steps: int) -> dict:
  """Times stage-2 train steps of one configuration at one global batch size."""
  config = get_config()
  config.vae.batch_size = batch_size
  sharding.check_batch_size(batch_size, 'vae.batch_size')
  mesh = sharding.make_mesh()
  model = npdraw.make_model(config)
  prior_params = jax.jit(lambda k: npdraw.init_variables(model, k))(jax.random.key(0))
  init_fn = train_vae.make_init_fn(config, model, prior_params['params']['prior'])
  state = train_lib.init_replicated(init_fn, mesh)
  train_step = train_vae.make_train_step(model, config, mesh, steps_per_epoch=100)
  p, c = config.model.patch_size, config.data.channels
  bank = sharding.replicate(
    np.random.default_rng(1).random((config.model.K, p, p, c), dtype=np.float32), mesh
  )
  batch = sharding.to_global(random_batch(config, model.grid.num_locations, batch_size), mesh)
  start = time.perf_counter()
  compiled = train_step.lower(state, bank, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_bytes = None
  if memory is not None:
    xla_bytes = (
      memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    )

  def step():
    # The step donates its state, so each call continues from the last one's.
    nonlocal state
    state, metrics = compiled(state, bank, batch)
    return metrics

  logging.info(
    '%s, batch %d: compiled in %.1f s; running %d steps.', name, batch_size, compile_s, steps + 1
  )
  timed = timing.time_call(step, repeats=steps)
  loss = float(timed['output']['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{name}, batch {batch_size}: non-finite loss {loss}.')
  logging.info(
    '%s, batch %d: first step %.1f s, then %s', name, batch_size, timed['compile_s'], timed['all_s']
  )
  stats = jax.devices()[0].memory_stats() or {}
  return {
    'name': name,
    'batch': batch_size,
    'image': f'{config.data.image_size}x{config.data.image_size}x{c}',
    'compile_s': compile_s,
    'first_s': timed['compile_s'],
    'median_s': timed['median_s'] or timed['compile_s'],
    'xla_gib': None if xla_bytes is None else xla_bytes / 2**30,
    'device_peak_gib': stats.get('peak_bytes_in_use', 0) / 2**30 or None,
  }


def _gib(value) -> str:
  return 'n/a' if value is None else f'{value:.2f}'


def table(rows: list[dict], steps: int) -> list[str]:
  """Markdown for the measured configurations."""
  lines = [
    'Stage-2 train step (encoder, Gumbel latents, relaxed rendering, decoder, frozen-prior '
    f'KL, parse supervision, backward, Adam), random data, {jax.device_count()} device(s). '
    f'Compile time apart; "first step" runs the compiled step once; median over the next '
    f"{steps} steps (the first step when 0). Memory: XLA's "
    'account of the compiled step (arguments + outputs + temporaries); device peak where '
    'the backend reports it (not on CPU).',
    '',
    '| config | image | batch | compile (s) | first step (s) | s / step (median) | images/s '
    '| XLA memory (GiB) | device peak (GiB) |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["name"]} | {row["image"]} | {row["batch"]} | {row["compile_s"]:.1f} | '
      f'{row["first_s"]:.1f} | '
      f'{row["median_s"]:.3f} | {row["batch"] / row["median_s"]:,.3g} | '
      f'{_gib(row["xla_gib"])} | {_gib(row["device_peak_gib"])} |'
    )
  return lines


def main(argv):
  del argv
  start = time.perf_counter()
  rows = []
  for name in _ONLY.value:
    get_config = CONFIGS[name]
    for batch_size in dict.fromkeys((SMALL_BATCH, get_config().vae.batch_size)):
      rows.append(measure(name, get_config, batch_size, _STEPS.value))
  lines = table(rows, _STEPS.value)
  lines += ['', f'Whole benchmark: {time.perf_counter() - start:.0f} s.']
  print(results.append_section('VAE (stage-2) training throughput', lines))


if __name__ == '__main__':
  app.run(main)
