"""The only module that imports Orbax: train-state checkpoints of a stage.

Each stage keeps its checkpoints in its own directory (DIR/prior, DIR/vae)
with `settings.json`: what a checkpoint must agree with to be restored (model
shapes, the data it was trained on). Restoring under other settings is a
clear error rather than a shape traceback deep inside Orbax. A stage that
selects models keeps its best checkpoint so far in DIR/STAGE/best.
"""

import json
import math
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from npdraw_jax import errors

SETTINGS_FILE = 'settings.json'
CONFIG_FILE = 'config.json'  # The whole configuration of the latest run, for reference.


class IncompatibleCheckpointError(errors.UserError, ValueError):
  """The checkpoints on disk were made under other settings."""


def _differences(old, new, prefix=''):
  """Dotted keys whose values differ between two nested dicts."""
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return [] if old == new else [prefix.rstrip('.') or '(value)']
  return [
    d
    for k in sorted(set(old) | set(new))
    for d in _differences(old.get(k), new.get(k), f'{prefix}{k}.')
  ]


class Checkpoints:
  """Periodic, final and resumable checkpoints of a train state.

  Args:
    directory: where checkpoints live (made absolute; Orbax rejects relative).
    settings: JSON-able dict a restored checkpoint must match.
    keep: how many recent checkpoints to keep.
    every: save interval in steps (other steps are skipped unless forced).
    config: the run's whole configuration, written beside the checkpoints.
  """

  def __init__(
    self,
    directory: str,
    settings: dict,
    keep: int,
    every: int,
    config: ml_collections.ConfigDict | None = None,
  ):
    self.directory = os.path.abspath(directory)
    self._check_settings(settings)
    if config is not None and jax.process_index() == 0:
      with open(os.path.join(self.directory, CONFIG_FILE), 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every),
    )

  def _check_settings(self, settings: dict) -> None:
    path = os.path.join(self.directory, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))  # Tuples become lists, as on disk.
    if os.path.exists(path):
      with open(path) as f:
        found = json.load(f)
      if found != settings:
        raise IncompatibleCheckpointError(
          f'{self.directory} holds checkpoints made under other settings '
          f'(differing: {", ".join(_differences(found, settings))}). Use another '
          '--workdir, or delete that directory to start this stage afresh.'
        )
    elif jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      with open(path, 'w') as f:
        json.dump(settings, f, indent=2, sort_keys=True)

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """Restores the newest checkpoint into the structure, shapes and shardings
    of `abstract_state` (jax.ShapeDtypeStruct leaves with shardings)."""
    step = self._manager.latest_step()
    logging.info('Restoring %s step %d.', self.directory, step)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def is_due(self, step: int) -> bool:
    """Whether a save at this step would write (on the interval)."""
    return self._manager.should_save(step)

  def save(self, step: int, state, force: bool = False) -> None:
    """Saves when step is on the interval, or always when forced."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self) -> None:
    """Waits for asynchronous saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


BEST_DIR = 'best'


class BestCheckpoint:
  """The checkpoint with the lowest value of a metric so far, in DIRECTORY/best.

  The value is stored with the checkpoint (as its Orbax metrics), so the best
  so far survives a resume. Open it after the stage's Checkpoints, whose
  settings check covers this subdirectory too; Orbax ignores it when listing
  the periodic checkpoints beside it.

  Args:
    directory: the stage's checkpoint directory.
    metric: the name of the value, lower is better (e.g. a held-out NLL).
  """

  def __init__(self, directory: str, metric: str):
    self.directory = os.path.join(os.path.abspath(directory), BEST_DIR)
    self.metric = metric
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics[metric], best_mode='min'
      ),
    )
    step = self._manager.best_step()
    self._best = None if step is None else (step, float(self._manager.metrics(step)[metric]))

  def best(self) -> tuple[int, float] | None:
    """(step, value) of the best checkpoint, or None before the first."""
    return self._best

  def update(self, step: int, state, value: float) -> bool:
    """Saves state as the best when value is finite and below the best so far.

    Every process must call it with the same value. Returns whether it saved.
    A step already saved (a resumed run evaluating it again) is not saved twice.
    """
    current = self.best()
    if not math.isfinite(value) or (current is not None and value >= current[1]):
      return False
    if current is not None and step == current[0]:
      return False
    self._manager.save(
      step, args=ocp.args.StandardSave(state), metrics={self.metric: value}, force=True
    )
    self._best = step, float(value)
    return True

  def restore(self, abstract_state):
    """Restores the best checkpoint into the structure, shapes and shardings of
    `abstract_state`; a FileNotFoundError when there is none."""
    found = self.best()
    if found is None:
      raise FileNotFoundError(f'No best checkpoint in {self.directory}.')
    logging.info('Restoring %s step %d (%s %.6g).', self.directory, found[0], self.metric, found[1])
    return self._manager.restore(found[0], args=ocp.args.StandardRestore(abstract_state))

  def close(self) -> None:
    """Waits for asynchronous saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def read_config(directory: str) -> ml_collections.ConfigDict:
  """The configuration a stage wrote beside its checkpoints in DIR/STAGE."""
  path = os.path.join(os.path.abspath(directory), CONFIG_FILE)
  if not os.path.exists(path):
    workdir, stage = os.path.split(os.path.abspath(directory))
    raise errors.MissingArtifactError(
      f'{path} is missing: run the {stage} stage in {workdir} first.'
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
