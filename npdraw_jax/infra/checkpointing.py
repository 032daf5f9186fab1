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

A step folder that cannot be restored (a file a restore reads is missing,
truncated or garbled, or the folder is empty: see `step_problem`) is not
restored: the newest usable step is. The unusable one is reported in one
warning line and moved aside to DIR/STAGE/<step>.unreadable, where Orbax does
not see it and the user can look at it; a read-only opening (or a directory
that cannot be changed) only skips it. Steps are set aside only when an older
one is usable, so a stage with no usable step stops (UnreadableCheckpointError)
with its folders where they were; a best checkpoint is set aside alone (there
is then no best so far). The newest step is checked when the directory is
opened, so `latest_step()` is the step that restores; restoring checks older
steps only if Orbax still fails on the newest.
"""

import errno
import gc
import glob
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import artifacts, run_dir

TRAINING_KEY, CHANGES_KEY = 'training', 'changes'
# [{'step', 'count'}]: the device count the stage trained on from each step. Not
# checked: a run may move to other devices, but it is then not bit-identical.
DEVICES_KEY = 'devices'
ALLOW_FLAG = '--allow_changed_settings'  # The launcher's flag that allows changed training.


class IncompatibleCheckpointError(errors.UserError, ValueError):
  """The checkpoints on disk were made under other settings."""


class ChangedSettingsError(IncompatibleCheckpointError):
  """The checkpoints were trained under other training settings (allowable)."""


class UnreadableCheckpointError(errors.UserError):
  """No checkpoint of a stage can be restored: each is missing files or damaged."""


def flat_fields(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf} of nested dicts; a non-dict is one leaf."""
  if not isinstance(tree, dict):
    return {prefix.rstrip('.') or '(value)': tree}
  return {
    k: v for key, value in tree.items() for k, v in flat_fields(value, f'{prefix}{key}.').items()
  }


_ABSENT = object()


def _differences(recorded: dict, requested: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (recorded, requested)} of the leaves that differ."""
  old, new = flat_fields(recorded), flat_fields(requested)
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
    for field, values in change['fields'].items():
      if 'requested' in values:
        training[field] = values['requested']
      else:  # A setting this run no longer has.
        training.pop(field, None)
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
  restore = {k: v for k, v in record.items() if k not in (TRAINING_KEY, CHANGES_KEY, DEVICES_KEY)}
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


# --- Steps that cannot be restored --------------------------------------------

STEP_NAME = re.compile(r'(0|[1-9]\d*)')  # Orbax's step folder names (no prefix, no padding).
UNREADABLE_SUFFIX = '.unreadable'  # A step set aside: <step>.unreadable (Orbax ignores it).
ITEM = 'default'  # The folder Orbax gives the state in a step (one StandardSave item).
METRICS_FILE = 'metrics/metrics'  # A step's Orbax metrics (the best checkpoint's value).
# The files Orbax reads to list and restore a step besides the item's OCDBT
# database; the required ones must be there, all must parse. Other files
# (commit_success.txt, each process's own database) are not read to restore, and
# are not checked: Orbax may change them between versions.
REQUIRED_JSON = ('_CHECKPOINT_METADATA', f'{ITEM}/_METADATA')
OPTIONAL_JSON = (f'{ITEM}/_sharding', f'{ITEM}/array_metadatas/*')
MAX_REASON_CHARS = 300
READ_BATCH = 16  # Values read at once when checking a database: bounds the memory.


def _one_line(error: BaseException) -> str:
  """'Type: the first line of the message' of the error's root cause (Orbax
  wraps TensorStore's error in one that prints a page), short enough for a log line."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0] if lines else ""}'
  return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + '...'


def _is_abandoned_read(unraisable) -> bool:
  """Whether Python reports an array read Orbax abandoned when a restore failed:
  the read itself (a page: its TensorStore spec) or its result arriving after
  Orbax closed its event loop."""
  if getattr(unraisable.object, '__qualname__', '') == '_read_array_index_and_device_put':
    return True
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def _try_restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, str]:
  """(the restored state, '') or (None, why Orbax failed on the step, in one line).

  Python would print a traceback for each array read Orbax abandons when a
  restore fails: they are dropped while the failure's frames are let go.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(abstract_state)), ''
    except Exception as e:  # Whatever Orbax or TensorStore raise on a damaged step.
      problem = _one_line(e)
    gc.collect()  # The failure's frames, holding the abandoned reads, are cycles.
    return None, problem
  finally:
    sys.unraisablehook = previous


def _json_problem(step_dir: str, name: str) -> str | None:
  """Why the JSON file step_dir/name cannot be read, or None."""
  path = os.path.join(step_dir, name)
  if not os.path.isfile(path):
    return f'{name} is missing'
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    return f'{name} cannot be read ({e})'
  if not data:
    return f'{name} is empty'
  try:
    json.loads(data.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    return f'{name} is not valid JSON ({e})'
  return None


def _database_problem(item_dir: str) -> str | None:
  """Why the item's OCDBT database (manifest.ocdbt, its b-tree and the data
  files it points to) cannot be read whole, or None. Reads every stored value
  once: what a restore reads, without the devices."""
  manifest = f'{os.path.basename(item_dir)}/manifest.ocdbt'
  if not os.path.isfile(os.path.join(item_dir, 'manifest.ocdbt')):
    return f'{manifest} is missing'  # TensorStore would read an empty database.
  try:
    store = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{item_dir}/'}).result()
    keys = store.list().result()
    for start in range(0, len(keys), READ_BATCH):
      batch = keys[start : start + READ_BATCH]
      for key, read in zip(batch, [store.read(key) for key in batch], strict=True):
        # No array file or chunk is empty: an empty value is one whose data file is
        # gone (TensorStore reads a missing data file as empty, not as an error).
        result = read.result()
        if result.state != 'value' or not result.value:
          return f'{os.path.basename(item_dir)}/{key.decode()} is missing from its data files'
  except Exception as e:  # Whatever TensorStore raises on a damaged file (ValueError today).
    return _one_line(e)
  return None if keys else f'{manifest} lists no arrays'


def step_problem(step_dir: str, required: tuple[str, ...] = ()) -> str | None:
  """Why the checkpoint in step_dir cannot be restored, or None when every file
  a restore reads is there and whole: its metadata files parse and its
  database reads. `required`: more JSON files that must be there (metrics)."""
  if not os.path.isdir(step_dir):
    return 'it is not a folder'
  try:
    if not os.listdir(step_dir):
      return 'the folder is empty'
  except OSError as e:
    return f'the folder cannot be listed ({e})'
  for name in REQUIRED_JSON + required:
    if problem := _json_problem(step_dir, name):
      return problem
  for pattern in OPTIONAL_JSON:
    for path in sorted(glob.glob(os.path.join(step_dir, pattern))):
      if problem := _json_problem(step_dir, os.path.relpath(path, step_dir)):
        return problem
  return _database_problem(os.path.join(step_dir, ITEM))


def _steps_on_disk(directory: str) -> list[int]:
  """The steps with a folder in directory, oldest first (as Orbax would list them)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if STEP_NAME.fullmatch(name))


def _move_aside(step_dir: str) -> str:
  """Renames step_dir to <step>.unreadable (or .unreadable.2, ...); returns the new path."""
  aside, n = step_dir + UNREADABLE_SUFFIX, 1
  while os.path.lexists(aside):
    n += 1
    aside = f'{step_dir}{UNREADABLE_SUFFIX}.{n}'
  os.rename(step_dir, aside)
  return aside


class _VisibleSteps(ocp.path.step.NameFormat):
  """Orbax's standard step names, without the steps set aside: a step that is
  skipped but not moved (read-only) is not listed, restored, kept or deleted."""

  def __init__(self, hidden: set[int]):
    self._standard = ocp.path.step.standard_name_format()
    self._hidden = hidden

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_all(self, base_path) -> Iterator[ocp.path.step.Metadata]:
    return (m for m in self._standard.find_all(base_path) if m.step not in self._hidden)

  def find_step(self, base_path, step: int) -> ocp.path.step.Metadata:
    if step in self._hidden:
      raise ValueError(f'Step {step} in {base_path} was set aside as unreadable.')
    return self._standard.find_step(base_path, step)


def _set_aside(directory: str, step: int, reason: str, hidden: set[int], may_move: bool) -> None:
  """Hides the step from this process's Orbax (until it is saved anew) and,
  when may_move, moves it aside (process 0); one warning line either way."""
  hidden.add(step)
  path = os.path.join(directory, str(step))
  if not may_move:
    logging.warning(
      'Checkpoint %s cannot be restored (%s); skipped, left in place (opened read-only).',
      path,
      reason,
    )
    return
  if jax.process_index() != 0:
    logging.warning('Checkpoint %s cannot be restored (%s); skipped.', path, reason)
    return
  try:
    aside = _move_aside(path)
  except OSError as e:
    logging.warning(
      'Checkpoint %s cannot be restored (%s); skipped (could not move it aside: %s).',
      path,
      reason,
      e,
    )
  else:
    logging.warning('Checkpoint %s cannot be restored (%s); moved it to %s.', path, reason, aside)


def _no_usable_step(directory: str, broken: list[tuple[int, str]]) -> UnreadableCheckpointError:
  """The error of a stage none of whose steps restores; nothing was moved."""
  reasons = '; '.join(f'step {step}: {reason}' for step, reason in broken)
  return UnreadableCheckpointError(
    f'{directory} holds no checkpoint that can be restored ({reasons}). Put back intact '
    'copies of the step folders, or move them out of it to train this stage again from '
    'step 0.'
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
      self._write_record(
        {**_as_json(settings), TRAINING_KEY: self._training, CHANGES_KEY: [], DEVICES_KEY: []}
      )
      self._write_config()
    self._read_only = read_only
    self._hidden: set[int] = set()  # Steps set aside: Orbax does not see them.
    self._usable: set[int] = set()  # Steps checked whole in this process.
    self._set_aside_unusable_newest()  # Before Orbax reads the steps' metadata.
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=every,
        read_only=read_only,
        create=not read_only,
        multiprocessing_options=_barrier_names(self.directory),
        step_name_format=_VisibleSteps(self._hidden),
      ),
    )

  def _problem(self, step: int) -> str | None:
    """Why the step cannot be restored (step_problem), or None; remembers a usable step."""
    if step in self._usable:
      return None
    problem = step_problem(os.path.join(self.directory, str(step)))
    if problem is None:
      self._usable.add(step)
    return problem

  def _set_aside_all(self, broken: list[tuple[int, str]]) -> None:
    for step, reason in broken:
      _set_aside(self.directory, step, reason, self._hidden, not self._read_only)

  def _set_aside_unusable_newest(self) -> None:
    """Sets aside the steps newer than the newest usable one; raises when no
    step is usable (moving nothing)."""
    broken = []
    for step in reversed(_steps_on_disk(self.directory)):
      problem = self._problem(step)
      if problem is None:
        self._set_aside_all(broken)
        return
      broken.append((step, problem))
    if broken:
      raise _no_usable_step(self.directory, broken)

  def _write_record(self, record: dict) -> None:
    artifacts.save_json(os.path.join(self.directory, run_dir.SETTINGS_FILE), record)

  def _write_config(self) -> None:
    if self._config is not None:
      config = json.loads(self._config.to_json_best_effort())
      artifacts.save_json(os.path.join(self.directory, run_dir.CONFIG_FILE), config)

  def record_training(self, step: int) -> None:
    """Records that the stage trains from `step` under this run's settings:
    the changed training settings (with the step), a changed device count
    (warned about: the run is then not bit-identical to one that stayed),
    and config.json. Call it only when steps will be trained."""
    if jax.process_index() != 0:
      return
    record = read_record(self.directory)
    devices = record.setdefault(DEVICES_KEY, [])
    moved = not devices or devices[-1]['count'] != jax.device_count()
    if moved:
      if devices and step > 0:
        logging.warning(
          '%s was trained on %d devices up to step %d and goes on on %d: the batches '
          'split differently, so the run is not bit-identical to one that stayed on %d.',
          self.directory,
          devices[-1]['count'],
          step,
          jax.device_count(),
          devices[-1]['count'],
        )
      devices.append({'step': step, 'count': jax.device_count()})
    if self._legacy:
      record[TRAINING_KEY] = self._training
      record[CHANGES_KEY] = [
        {'step': step, 'fields': {}, 'note': 'training settings first recorded at this step'}
      ]
    elif self._changed:
      # A setting absent on one side (added or removed since) has no key there.
      fields = {
        k: {
          **({} if a is _ABSENT else {'recorded': a}),
          **({} if b is _ABSENT else {'requested': b}),
        }
        for k, (a, b) in self._changed.items()
      }
      record[CHANGES_KEY].append({'step': step, 'fields': fields})
    if self._legacy or self._changed or moved:
      self._write_record(record)
    self._write_config()

  def has_unapplied_changes(self) -> bool:
    """Whether this run asked for changed training settings (allowed)."""
    return bool(self._changed)

  def latest_step(self) -> int | None:
    """The newest saved step that can be restored, or None."""
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """Restores the newest checkpoint into the structure, shapes and shardings
    of `abstract_state` (jax.ShapeDtypeStruct leaves with shardings).

    A step Orbax fails to restore is set aside once an older step restores
    (then latest_step() is that one); when none does, nothing is moved and
    UnreadableCheckpointError says why for each step.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    broken = []
    for step in steps:
      problem = self._problem(step)
      if problem is None:
        logging.info('Restoring %s step %d.', self.directory, step)
        state, problem = _try_restore(self._manager, step, abstract_state)
        if not problem:
          if broken:
            self._set_aside_all(broken)
            self._manager.reload()
          return state
      broken.append((step, problem))
    raise _no_usable_step(self.directory, broken)

  def is_due(self, step: int) -> bool:
    """Whether a save at this step would write (on the interval)."""
    return self._manager.should_save(step)

  def save(self, step: int, state, force: bool = False) -> None:
    """Saves when step is on the interval, or always when forced; an OSError
    (ENOSPC) before anything is written when the disk has no room for it."""
    if not (force or self._manager.should_save(step)):
      return
    self._hidden.discard(step)  # A step set aside (moved) may be saved anew.
    self._manager.wait_until_finished()  # The save in flight takes its room first.
    check_room(self.directory, state)
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def close(self) -> None:
    """Waits for asynchronous saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


ROOM_MARGIN_BYTES = 1 << 20  # Metadata and file-system slack beside the arrays.


def check_room(directory: str, state) -> None:
  """An OSError (ENOSPC) when the disk of `directory` has no room for a checkpoint
  of `state`: found before Orbax writes, since a save that fills the disk half
  way fails in background threads, each printing its own traceback."""
  needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, 'nbytes'))
  os.makedirs(directory, exist_ok=True)
  disk = os.statvfs(directory)
  free = disk.f_bavail * disk.f_frsize
  if free < needed + ROOM_MARGIN_BYTES:
    raise OSError(
      errno.ENOSPC,
      f'No space left on device: {free / 2**20:.1f} MiB free, a checkpoint needs about '
      f'{(needed + ROOM_MARGIN_BYTES) / 2**20:.1f} MiB',
      directory,
    )


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
    # A best step that cannot be restored is set aside (none left: no best so far).
    self._hidden: set[int] = set()
    for step in _steps_on_disk(self.directory):
      problem = step_problem(os.path.join(self.directory, str(step)), (METRICS_FILE,))
      if problem is not None:
        _set_aside(self.directory, step, problem, self._hidden, not read_only)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda metrics: metrics[metric],
        best_mode='min',
        read_only=read_only,
        create=not read_only,
        multiprocessing_options=_barrier_names(self.directory),
        step_name_format=_VisibleSteps(self._hidden),
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
    self._hidden.discard(step)  # A step set aside (moved) may be saved anew.
    self._manager.wait_until_finished()
    check_room(self.directory, state)
    self._manager.save(
      step, args=ocp.args.StandardSave(state), metrics={self.metric: value}, force=True
    )
    self._best = step, float(value)
    return True

  def restore(self, abstract_state):
    """Restores the best checkpoint into the structure, shapes and shardings of
    `abstract_state`; a FileNotFoundError when there is none, an
    UnreadableCheckpointError (moving nothing) when Orbax fails on it."""
    found = self.best()
    if found is None:
      raise FileNotFoundError(f'No best checkpoint in {self.directory}.')
    logging.info('Restoring %s step %d (%s %.6g).', self.directory, found[0], self.metric, found[1])
    self._manager.wait_until_finished()  # It may have been saved a moment ago.
    state, problem = _try_restore(self._manager, found[0], abstract_state)
    if problem:
      path = os.path.join(self.directory, str(found[0]))
      raise UnreadableCheckpointError(
        f'The best checkpoint {path} cannot be restored ({problem}). Move it out of '
        f'{self.directory} to use the last checkpoint instead.'
      )
    return state

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
