"""The only module that imports Orbax: train-state checkpoints of a stage.

Each stage keeps its checkpoints in its own directory (DIR/prior, DIR/vae)
with `settings.json`, the record of what its checkpoints are:

  - the settings a checkpoint must agree with to be restored at all (model
    shapes, the data and part bank its outputs refer to), at the top level;
  - 'training': every setting that shaped what the stage trained (learning
    rate, schedule length, batch size, loss weights, ...), by config field;
  - 'changes': the training settings changed later, each with the step from
    which the checkpoints were trained under it.

A run whose settings differ from the record stops before any work with one
line naming each field, its recorded and its requested value. Changed
training settings may be continued under explicitly (the launcher's
--allow_changed_settings); changed restore settings never. The record and
the run's whole configuration (config.json, for reference) are written only
when the stage directory is made and when the stage trains steps: reading a
stage (restoring for a later stage, evaluating, editing) writes nothing. A
stage that selects models keeps its best checkpoint so far in DIR/STAGE/best.
"""

import json
import math
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import artifacts, run_dir

TRAINING_KEY, CHANGES_KEY = 'training', 'changes'
ALLOW_FLAG = '--allow_changed_settings'  # The launcher's flag that allows changed training.


class IncompatibleCheckpointError(errors.UserError, ValueError):
  """The checkpoints on disk were made under other settings."""


class ChangedSettingsError(IncompatibleCheckpointError):
  """The checkpoints were trained under other training settings (allowable)."""


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf} of nested dicts; a non-dict is one leaf."""
  if not isinstance(tree, dict):
    return {prefix.rstrip('.') or '(value)': tree}
  return {k: v for key, value in tree.items() for k, v in _flat(value, f'{prefix}{key}.').items()}


_ABSENT = object()


def _differences(recorded: dict, requested: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (recorded, requested)} of the leaves that differ."""
  old, new = _flat(recorded), _flat(requested)
  return {
    k: (old.get(k, _ABSENT), new.get(k, _ABSENT))
    for k in sorted(set(old) | set(new))
    if old.get(k, _ABSENT) != new.get(k, _ABSENT)
  }


def _describe(differences: dict[str, tuple[Any, Any]]) -> str:
  """'a.b: recorded 1.0, requested 0.5; ...'."""
  show = lambda v: 'absent' if v is _ABSENT else repr(v)
  return '; '.join(
    f'{k}: recorded {show(a)}, requested {show(b)}' for k, (a, b) in differences.items()
  )


def _as_json(tree):
  """Tuples become lists, as on disk."""
  return json.loads(json.dumps(tree))


def config_fields(config: ml_collections.ConfigDict, fields) -> dict[str, Any]:
  """{dotted field: its value in config} (a section as a dict, tuples as lists)."""
  values = {}
  for field in fields:
    value = config
    for part in field.split('.'):
      value = value[part]
    values[field] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return _as_json(values)


def read_record(directory: str) -> dict | None:
  """The settings record of a stage directory, or None when there is none."""
  path = os.path.join(os.path.abspath(directory), run_dir.SETTINGS_FILE)
  if not os.path.exists(path):
    return None
  return run_dir.read_json(path)


def recorded_training(record: dict) -> dict | None:
  """The training settings the newest checkpoints were trained under (the
  original ones with every later change applied); None for a record written
  before training settings were recorded."""
  if TRAINING_KEY not in record:
    return None
  training = dict(record[TRAINING_KEY])
  for change in record.get(CHANGES_KEY, []):
    training.update({k: v['requested'] for k, v in change['fields'].items()})
  return training


def check_settings(
  directory: str, settings: dict, training: dict, allow_changed_settings: bool = False
) -> dict[str, tuple[Any, Any]]:
  """Checks a stage's record against the settings a run requests; writes nothing.

  Args:
    directory: the stage's checkpoint directory (it need not exist).
    settings: what a checkpoint must agree with to be restored.
    training: {config field: value} of every setting shaping the training.
    allow_changed_settings: changed training settings are allowed.

  Returns:
    {field: (recorded, requested)} of the training settings that differ (only
    when allowed), {} when none differ or there is no record.

  Raises:
    IncompatibleCheckpointError: the restore settings differ.
    ChangedSettingsError: training settings differ and that is not allowed.
  """
  directory = os.path.abspath(directory)
  record = read_record(directory)
  if record is None:
    return {}
  restore = {k: v for k, v in record.items() if k not in (TRAINING_KEY, CHANGES_KEY)}
  differing = _differences(restore, _as_json(settings))
  if differing:
    raise IncompatibleCheckpointError(
      f'{directory} holds checkpoints that cannot be restored under this configuration '
      f'({_describe(differing)}). Use a new --workdir, or delete {directory} (and the '
      'stages after it) to train this stage afresh.'
    )
  found = recorded_training(record)
  if found is None:
    if training:
      logging.warning(
        '%s was recorded before training settings were; they cannot be checked. The '
        'next training of this stage records them.',
        directory,
      )
    return {}
  changed = _differences(found, _as_json(training))
  if changed and not allow_changed_settings:
    raise ChangedSettingsError(
      f'{directory} holds checkpoints trained under other settings: {_describe(changed)}. '
      'Use a new --workdir to train under these settings from scratch, or pass '
      f'{ALLOW_FLAG} to continue training these checkpoints under them (both are recorded).'
    )
  if changed:
    logging.warning(
      '%s was trained under other settings; allowed: %s.', directory, _describe(changed)
    )
  return changed


def _barrier_names(directory: str) -> ocp.options.MultiprocessingOptions:
  """Orbax's multi-process barriers named after the directory: the stage's
  periodic and best checkpoints of one step must not share a barrier."""
  parent, name = os.path.split(directory)
  return ocp.options.MultiprocessingOptions(
    barrier_sync_key_prefix=f'{os.path.basename(parent)}_{name}'
  )


class Checkpoints:
  """Periodic, final and resumable checkpoints of a train state.

  Args:
    directory: where checkpoints live (made absolute; Orbax rejects relative).
    settings: JSON-able dict a restored checkpoint must match.
    keep: how many recent checkpoints to keep.
    every: save interval in steps (other steps are skipped unless forced).
    config: the run's whole configuration, written beside the checkpoints
      when the directory is made and by record_training.
    training: {config field: value} of the settings that shape the training.
    allow_changed_settings: continue under training settings that differ from
      the record (record_training records them).
    read_only: only restore: a missing directory is a MissingArtifactError and
      nothing is ever written.
  """

  def __init__(
    self,
    directory: str,
    settings: dict,
    keep: int,
    every: int,
    config: ml_collections.ConfigDict | None = None,
    *,
    training: dict | None = None,
    allow_changed_settings: bool = False,
    read_only: bool = False,
  ):
    self.directory = os.path.abspath(directory)
    self._config = config
    self._training = _as_json(training or {})
    record = read_record(self.directory)
    if read_only and record is None:
      workdir, stage = os.path.split(self.directory)
      raise errors.MissingArtifactError(
        f'{self.directory} holds no checkpoints: run the {stage} stage in {workdir} first.'
      )
    self._changed = check_settings(self.directory, settings, self._training, allow_changed_settings)
    self._legacy = record is not None and TRAINING_KEY not in record
    if record is None and jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      self._write_record({**_as_json(settings), TRAINING_KEY: self._training, CHANGES_KEY: []})
      self._write_config()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=every,
        read_only=read_only,
        create=not read_only,
        multiprocessing_options=_barrier_names(self.directory),
      ),
    )

  def _write_record(self, record: dict) -> None:
    artifacts.save_json(os.path.join(self.directory, run_dir.SETTINGS_FILE), record)

  def _write_config(self) -> None:
    if self._config is not None:
      config = json.loads(self._config.to_json_best_effort())
      artifacts.save_json(os.path.join(self.directory, run_dir.CONFIG_FILE), config)

  def record_training(self, step: int) -> None:
    """Records that the stage trains from `step` under this run's settings:
    the changed training settings (with the step), and config.json. Call it
    only when steps will be trained."""
    if jax.process_index() != 0:
      return
    record = read_record(self.directory)
    if self._legacy:
      record[TRAINING_KEY] = self._training
      record[CHANGES_KEY] = [
        {'step': step, 'fields': {}, 'note': 'training settings first recorded at this step'}
      ]
    elif self._changed:
      fields = {k: {'recorded': a, 'requested': b} for k, (a, b) in self._changed.items()}
      record[CHANGES_KEY].append({'step': step, 'fields': fields})
    if self._legacy or self._changed:
      self._write_record(record)
    self._write_config()

  def has_unapplied_changes(self) -> bool:
    """Whether this run asked for changed training settings (allowed)."""
    return bool(self._changed)

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


class BestCheckpoint:
  """The checkpoint with the lowest value of a metric so far, in DIRECTORY/best.

  The value is stored with the checkpoint (as its Orbax metrics), so the best
  so far survives a resume. Open it after the stage's Checkpoints, whose
  settings check covers this subdirectory too; Orbax ignores it when listing
  the periodic checkpoints beside it.

  Args:
    directory: the stage's checkpoint directory.
    metric: the name of the value, lower is better (e.g. a held-out NLL).
    read_only: only restore; nothing is written (and no best when it has none).
  """

  def __init__(self, directory: str, metric: str, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(directory), run_dir.BEST_DIR)
    self.metric = metric
    self._best = None
    self._manager = None
    if read_only and not os.path.isdir(self.directory):
      return
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda metrics: metrics[metric],
        best_mode='min',
        read_only=read_only,
        create=not read_only,
        multiprocessing_options=_barrier_names(self.directory),
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
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()


def read_config(directory: str) -> ml_collections.ConfigDict:
  """The configuration a stage wrote beside its checkpoints in DIR/STAGE."""
  path = os.path.join(os.path.abspath(directory), run_dir.CONFIG_FILE)
  if not os.path.exists(path):
    workdir, stage = os.path.split(os.path.abspath(directory))
    raise errors.MissingArtifactError(
      f'{path} is missing: run the {stage} stage in {workdir} first.'
    )
  return ml_collections.ConfigDict(run_dir.read_json(path))
