"""What both training stages share: state, optimizer, metrics, the loop."""

import json
import math
import os
from collections.abc import Callable

import jax
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from flax.training import train_state
from tqdm import tqdm

from npdraw_jax import checkpointing, sharding

METRICS_FILE = 'metrics.jsonl'


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the loop key (folded with the step each step)."""

  rng: jax.Array


def warmup_decay_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up to lr, then cosine decay to lr / 100 at total_steps."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=lr,
    warmup_steps=max(1, min(warmup_steps, total_steps - 1)),
    decay_steps=max(2, total_steps),
    end_value=lr / 100,
  )


def init_replicated(init_fn: Callable[[], TrainState], mesh) -> TrainState:
  """Runs init_fn under jit straight into replicated device memory."""
  return jax.jit(init_fn, out_shardings=sharding.replicated(mesh))()


def abstract_state(init_fn: Callable[[], TrainState], mesh) -> TrainState:
  """The replicated shapes of init_fn's state, as a target to restore into."""
  replicated = sharding.replicated(mesh)
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
    jax.eval_shape(init_fn),
  )


def restore_or_init(
  checkpoints: checkpointing.Checkpoints, init_fn: Callable[[], TrainState], mesh
) -> TrainState:
  """The newest checkpoint if there is one, else a fresh state."""
  if checkpoints.latest_step() is None:
    return init_replicated(init_fn, mesh)
  return checkpoints.restore(abstract_state(init_fn, mesh))


class MetricsLog:
  """Scalars to TensorBoard (DIR/tensorboard/STAGE) and to DIR/metrics.jsonl.

  Each JSON line holds 'stage', 'step', 'split' and the metrics. Only process
  0 writes.
  """

  def __init__(self, workdir: str, stage: str):
    self.stage = stage
    self._writes = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_FILE)
    self._writer = metric_writers.create_default_writer(
      os.path.join(workdir, 'tensorboard', stage), just_logging=not self._writes
    )

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    metrics = {k: float(v) for k, v in metrics.items()}
    self._writer.write_scalars(step, {f'{split}/{k}': v for k, v in metrics.items()})
    if self._writes:
      record = {'stage': self.stage, 'step': step, 'split': split, **metrics}
      with open(self._path, 'a') as f:
        f.write(json.dumps(record) + '\n')

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


def check_finite(metrics: dict[str, float], step: int, stage: str) -> None:
  """Stops the run on a NaN or infinite metric, naming the step."""
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
      f'Stage {stage}: non-finite {bad} at step {step}. Stopped without saving this '
      'state; the last good checkpoint is kept.'
    )


def train_loop(
  *,
  stage: str,
  state: TrainState,
  train_step: Callable,
  batch_at: Callable[[int], dict],
  num_steps: int,
  checkpoints: checkpointing.Checkpoints,
  metrics_log: MetricsLog,
  log_every: int,
  eval_every: int,
  evaluate: Callable[[TrainState], dict[str, float]],
  description: str,
  eval_split: str = 'test',
) -> TrainState:
  """Runs train_step from state.step to num_steps with logging, evals, checkpoints.

  train_step(state, batch) -> (state, metrics); batch_at(step) gives the
  (global) batch of a step, so a resumed run sees the data it would have.
  evaluate(state) runs every eval_every steps and at the last; its results
  are logged under eval_split (the split it measures).
  Metrics are fetched from the device only at log, eval and checkpoint steps.
  `description` (what is trained, on what) is logged when steps remain; a
  state already at num_steps is returned as it is.
  """
  start = int(jax.device_get(state.step))
  if start >= num_steps:
    logging.info('Stage %s: already trained to step %d; skipping.', stage, start)
    return state
  logging.info('Stage %s: steps %d -> %d, %s.', stage, start, num_steps, description)
  bar = tqdm(total=num_steps, initial=start, desc=stage, unit='step', dynamic_ncols=True)
  for step in range(start, num_steps):
    state, metrics = train_step(state, batch_at(step))
    done = step + 1
    is_last = done == num_steps
    will_save = is_last or checkpoints.is_due(done)
    if will_save or done % log_every == 0:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite(values, done, stage)
      metrics_log.write(done, 'train', values)
      bar.set_postfix({k: f'{v:.4g}' for k, v in values.items() if k in ('loss', 'nll')})
    if eval_every and (done % eval_every == 0 or is_last):
      results = evaluate(state)
      metrics_log.write(done, eval_split, results)
      logging.info('%s step %d %s: %s', stage, done, eval_split, results)
    checkpoints.save(done, state, force=is_last)
    bar.update(1)
  bar.close()
  return state


def evaluate_in_batches(eval_step: Callable, state: TrainState, batches, mesh) -> dict[str, float]:
  """Sums eval_step's per-batch sums over batches; divides by the 'count' sum."""
  totals = None
  for batch in batches:
    sums = jax.device_get(eval_step(state, sharding.to_global(batch, mesh)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  count = totals.pop('count')
  return {k: float(v) / float(count) for k, v in totals.items()}
