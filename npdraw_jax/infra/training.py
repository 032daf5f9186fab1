"""What both training stages share: state, optimizer, metrics, the loop."""

import collections
import dataclasses
import functools
import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from tqdm import tqdm

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, interrupt, run_dir, sharding

LOSS_NAMES = ('loss', 'nll')  # The stages' names of their training objective.
EXPLOSION_FACTOR = 100.0  # A logged loss this many times the run's median so far warns.
# How many dispatched steps may be unfinished on the device (JAX runs ahead of
# the host): enough to keep the device fed, few enough for a true progress bar.
MAX_STEPS_AHEAD = 2


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


@functools.cache
def hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow (tf.data, TensorBoard summaries) on the host; without
  this it takes the GPUs' memory that JAX needs. Imports TensorFlow (5 s)."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow's devices were set up before: leave them.
    logging.warning('TensorFlow was initialised before npdraw-jax could keep it off the GPUs.')


class MetricsLog:
  """Scalars to TensorBoard (DIR/tensorboard/STAGE) and to DIR/metrics.jsonl.

  Each JSON line holds 'stage', 'step', 'split' and the metrics. Only process
  0 writes.
  """

  def __init__(self, workdir: str, stage: str):
    self.stage = stage
    self._writes = jax.process_index() == 0
    self._path = os.path.join(workdir, run_dir.METRICS_FILE)
    # Imported here: clu's writer imports TensorFlow (5 s), which only a
    # stage that logs needs, not the API, the explorer or a refused command.
    hide_accelerators_from_tensorflow()
    from clu import metric_writers

    # Synchronous: a writer thread could print a step's metrics after the line
    # that ends the command (a full disk's error); a write every log_every
    # steps costs little.
    self._writer = metric_writers.create_default_writer(
      os.path.join(workdir, run_dir.TENSORBOARD_DIR, stage),
      just_logging=not self._writes,
      asynchronous=False,
    )

  def drop_after(self, step: int) -> None:
    """Keeps metrics.jsonl the true history of a run that resumes from `step`.

    Drops this stage's lines past `step` (written after the checkpoint the run
    resumes from, so the resumed run writes them again) and all but the last of
    lines that repeat one (stage, step, split), as a line a stage writes before
    training does when no checkpoint was saved. Other stages' lines stay.
    """
    self._keep(lambda record, is_last: record['step'] <= step and is_last, f'resumes from {step}')

  def drop_repeats(self) -> None:
    """Keeps only the last of this stage's lines for each (step, split): one
    eval line per evaluated checkpoint and split, whatever the eval settings."""
    self._keep(lambda record, is_last: is_last, 'keeps one line per step and split')

  def _keep(self, keep: Callable[[dict, bool], bool], why: str) -> None:
    """Rewrites metrics.jsonl (atomically, and only when a line goes) without
    this stage's lines for which keep(record, is_last_of_its_step_and_split)
    is false, lines cut short by a killed write and lines that do not decode."""
    if not self._writes or not os.path.exists(self._path):
      return
    with open(self._path, 'rb') as f:
      lines = f.read().splitlines()
    records = []
    for line in lines:
      try:
        records.append((line, json.loads(line.decode('utf-8'))))
      except (UnicodeDecodeError, json.JSONDecodeError):
        logging.warning('Dropping an unreadable line of %s: %r', self._path, line[:200])
    last_of = {
      (r['step'], r['split']): i for i, (_, r) in enumerate(records) if r['stage'] == self.stage
    }
    kept = [
      line
      for i, (line, r) in enumerate(records)
      if r['stage'] != self.stage or keep(r, last_of[r['step'], r['split']] == i)
    ]
    if len(kept) == len(lines):
      return
    logging.info(
      'Stage %s %s: %d lines leave %s.', self.stage, why, len(lines) - len(kept), self._path
    )
    directory = os.path.dirname(self._path)
    with tempfile.NamedTemporaryFile('wb', dir=directory, suffix='.tmp', delete=False) as f:
      f.write(b''.join(line + b'\n' for line in kept))
    os.replace(f.name, self._path)

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


@jax.jit
def _finite_parts(parts: dict) -> dict:
  """For each named pytree of parts: whether all its floating leaves are finite."""

  def all_finite(tree) -> jax.Array:
    leaves = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)

  return {name: all_finite(tree) for name, tree in parts.items()}


def check_finite(state: TrainState, metrics: dict) -> tuple[dict[str, float], list[str]]:
  """(the metrics on the host, what is non-finite) after a step.

  What is non-finite is named as the metrics ('loss=nan'), 'parameters',
  'optimizer state' and any other field of the state holding floats (e.g.
  'batch_stats'). The state is checked on its devices, in one jitted
  reduction; only the verdicts and the metrics come to the host.
  """
  parts = {'parameters': state.params, 'optimizer state': state.opt_state}
  for field in dataclasses.fields(state):
    if field.metadata.get('pytree_node', True) and field.name not in ('params', 'opt_state'):
      parts[field.name] = getattr(state, field.name)
  finite, metrics = jax.device_get((_finite_parts(parts), metrics))
  values = {k: float(v) for k, v in metrics.items()}
  non_finite = [f'{k}={v}' for k, v in values.items() if not math.isfinite(v)]
  non_finite += [name for name, ok in finite.items() if not ok]
  return values, non_finite


class _LossWatch:
  """Warns when the logged loss explodes while staying finite.

  The rule: a logged loss (the first of LOSS_NAMES in the metrics) whose
  magnitude is over EXPLOSION_FACTOR times the median magnitude of the
  earlier logged losses of this run explodes. A median shrugs off the high
  losses of the first steps, and exploded values stay out of it, so a lasting
  explosion does not raise its own bar. One warning per explosion: the next
  comes only after the loss has been back under the bar.
  """

  def __init__(self, stage: str):
    self._stage = stage
    self._history = []
    self._exploding = False

  def observe(self, step: int, metrics: dict[str, float]) -> None:
    name = next((k for k in LOSS_NAMES if k in metrics), None)
    if name is None:
      return
    size = abs(metrics[name])
    bar = EXPLOSION_FACTOR * statistics.median(self._history) if self._history else math.inf
    if size <= bar:
      self._history.append(size)
      self._exploding = False
      return
    if not self._exploding:
      logging.warning(
        'Stage %s: %s = %.4g at step %d, over %g times the median %.4g of the earlier '
        'logged values; training is diverging (a lower learning rate may help).',
        self._stage,
        name,
        metrics[name],
        step,
        EXPLOSION_FACTOR,
        bar / EXPLOSION_FACTOR,
      )
    self._exploding = True


def stops_early(step: int, best_step: int | None, patience: int, every: int) -> bool:
  """The early-stopping rule: whether training stops after the held-out check of
  `step` (the check runs every `every` steps), given the step of the best held-out
  bound so far (None before any: counted from step 0).

  It stops when patience > 0 and the best is `patience` or more steps old: at the
  first check at or past best_step + patience. A step off the checks' interval
  never stops, so a run resumed there trains on to the next check, as the run
  without the interruption did.
  """
  return patience > 0 and step % every == 0 and step - (best_step or 0) >= patience


def is_finished(
  latest_step: int, num_steps: int, best_step: int | None, patience: int, every: int
) -> bool:
  """Whether a run whose newest checkpoint is latest_step is done: trained to
  num_steps (the cap) or stopped early there (stops_early)."""
  return latest_step >= num_steps or stops_early(latest_step, best_step, patience, every)


def best_step(best: checkpointing.BestCheckpoint | None) -> int | None:
  """The step of the best checkpoint, or None when there is none (or no `best`)."""
  found = None if best is None else best.best()
  return None if found is None else found[0]


def held_out_stop(
  best: checkpointing.BestCheckpoint,
  patience: int,
  every: int,
  watched: str = 'the held-out bound',
) -> Callable[[int], str | None] | None:
  """train_loop's early_stop for a stage that checks a held-out measure (named
  `watched` in the log) every `every` steps and keeps its best checkpoint in
  `best`; None when patience is 0 (off)."""
  if patience == 0:
    return None

  def reason(step: int) -> str | None:
    since = best_step(best)
    if not stops_early(step, since, patience, every):
      return None
    return f'{watched} has not improved since step {since or 0} (patience {patience})'

  return reason


def _close_after_stop(checkpoints: checkpointing.Checkpoints, metrics_log: MetricsLog, bar) -> int:
  """Waits for the saves in flight and flushes the metrics; the step of the
  newest checkpoint on disk, or -1 when there is none."""
  bar.close()
  metrics_log.close()
  checkpoints.close()
  latest = checkpoints.latest_step()
  return -1 if latest is None else latest


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
  early_stop: Callable[[int], str | None] | None = None,
) -> TrainState:
  """Runs train_step from state.step to num_steps with logging, evals, checkpoints.

  train_step(state, batch) -> (state, metrics); batch_at(step) gives the
  (global) batch of a step, so a resumed run sees the data it would have.
  evaluate(state) runs every eval_every steps and at the last; its results
  are logged under eval_split (the split it measures). The metrics of
  log_every steps and of checkpoint steps are logged; metrics.jsonl loses the
  stage's lines past the step it starts from (MetricsLog.drop_after).
  `description` (what is trained, on what) is logged when steps remain; a
  state already at num_steps is returned as it is.

  early_stop(step) -> why training stops there, or None: asked after each
  evaluation before the last step (held_out_stop) and for the step the loop
  starts from. When it answers, that step is saved (as the last is), the log
  says 'Stage S: stopped early at step N: <why>.', and the loop returns; a run
  resumed at a step where it stopped trains no further.

  Safety: before each log, evaluation and save, check_finite checks the new
  state and the step's metrics; anything non-finite closes `checkpoints`
  (waiting for saves in flight) and raises errors.NonFiniteError, so no
  non-finite state is saved or evaluated. A finite loss that explodes is
  warned about (_LossWatch). A stop asked for with Ctrl-C (npdraw_jax/
  interrupt.py) is honoured after the step in progress: that step is checked
  and saved, `checkpoints` closed, and errors.Interrupted raised.

  The host dispatches at most MAX_STEPS_AHEAD steps beyond those the device
  has finished, and the progress bar counts finished steps.
  """
  start = int(jax.device_get(state.step))
  metrics_log.drop_after(start)
  if start >= num_steps:
    logging.info('Stage %s: already trained to step %d; skipping.', stage, start)
    return state
  stopped = early_stop(start) if early_stop else None
  if stopped:
    logging.info('Stage %s: stopped early at step %d: %s.', stage, start, stopped)
    return state
  logging.info('Stage %s: steps %d -> %d, %s.', stage, start, num_steps, description)
  # Closed on any exception too, so an error line starts on a line of its own.
  with tqdm(total=num_steps, initial=start, desc=stage, unit='step', dynamic_ncols=True) as bar:
    loss_watch = _LossWatch(stage)
    unfinished = collections.deque()  # The metrics of steps the device may still run.
    for step in range(start, num_steps):
      state, metrics = train_step(state, batch_at(step))
      unfinished.append(metrics)
      done = step + 1
      is_last = done == num_steps
      will_save = is_last or checkpoints.is_due(done)
      will_log = will_save or done % log_every == 0
      will_eval = bool(eval_every) and (done % eval_every == 0 or is_last)
      if not (will_save or will_log or will_eval or interrupt.requested()):
        if len(unfinished) > MAX_STEPS_AHEAD:
          jax.block_until_ready(unfinished.popleft())
          bar.update(1)
        continue
      values, non_finite = check_finite(state, metrics)
      bar.update(len(unfinished))  # Fetching the metrics waited for every step.
      unfinished.clear()
      if non_finite:
        kept = _close_after_stop(checkpoints, metrics_log, bar)
        raise errors.NonFiniteError(
          f'Stage {stage}: non-finite {", ".join(non_finite)} at step {done}; that state was '
          'not saved. '
          + (
            f'The last checkpoint, step {kept}, is kept in {checkpoints.directory}.'
            if kept >= 0
            else f'{checkpoints.directory} holds no checkpoint.'
          )
          + ' Lower the learning rate (or check the data) before training again.'
        )
      if will_log:
        metrics_log.write(done, 'train', values)
        loss_watch.observe(done, values)
        bar.set_postfix({k: f'{v:.4g}' for k, v in values.items() if k in LOSS_NAMES})
      if will_eval:
        results = evaluate(state)
        metrics_log.write(done, eval_split, results)
        logging.info('%s step %d %s: %s', stage, done, eval_split, results)
        if early_stop and not is_last:
          stopped = early_stop(done)
      # Asked for during the step or the evaluation; the last step or an early stop
      # ends the loop anyway.
      stopping = interrupt.requested() and not is_last and not stopped
      if will_save or stopping or stopped:
        checkpoints.save(done, state, force=True)
      if stopping:
        _close_after_stop(checkpoints, metrics_log, bar)
        raise errors.Interrupted(f'Stage {stage}: interrupted at step {done}', step=done)
      if stopped:
        break
  if stopped:
    logging.info('Stage %s: stopped early at step %d: %s.', stage, done, stopped)
  return state


def evaluate_in_batches(eval_step: Callable, state: TrainState, batches, mesh) -> dict[str, float]:
  """Sums eval_step's per-batch sums over batches; divides by the 'count' sum."""
  totals = None
  for batch in batches:
    sums = jax.device_get(eval_step(state, sharding.to_global(batch, mesh)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  count = totals.pop('count')
  return {k: float(v) / float(count) for k, v in totals.items()}
