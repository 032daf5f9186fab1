"""The run directory: the name of every file a run writes, and the one reader of
each finished stage's artifact and of every JSON record.

  DIR/.lock                       the process that holds DIR (workdir_lock)
  DIR/partbank.npz, partbank.png  bank stage: the parts and their picture
  DIR/parses.npz, parses.png      parse stage: both splits' parses
  DIR/prior/                      prior stage: checkpoints (one folder per step),
                                  settings.json and config.json
  DIR/prior_samples.png
  DIR/vae/, DIR/vae/best/         VAE stage: checkpoints; the best held-out one
  DIR/eval.json                   eval stage: the evaluated checkpoint, settings, summary
  DIR/samples.png, reconstructions.png, drawing.gif
  DIR/metrics.jsonl, DIR/tensorboard/<stage>/

An artifact (.npz) is read and checked against its stored checksum once per
process while the file is unchanged: the stages, the API and the commands that
open the same run share the reading.
"""

import json
import os
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import artifacts
from npdraw_jax.model import partbank

LOCK_FILE = '.lock'
BANK_FILE = 'partbank.npz'
BANK_PICTURE = 'partbank.png'
PARSES_FILE = 'parses.npz'
PARSES_PICTURE = 'parses.png'
PRIOR_DIR = 'prior'
PRIOR_SAMPLES_PICTURE = 'prior_samples.png'
VAE_DIR = 'vae'
BEST_DIR = 'best'  # Inside DIR/vae: the checkpoint of the best held-out bound.
SETTINGS_FILE = 'settings.json'  # In each checkpoint folder: what its checkpoints are.
CONFIG_FILE = 'config.json'  # In each checkpoint folder: the latest run's whole configuration.
EVAL_RECORD_FILE = 'eval.json'
SAMPLES_PICTURE = 'samples.png'
RECONSTRUCTIONS_PICTURE = 'reconstructions.png'
DRAWING_ANIMATION = 'drawing.gif'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# What the VAE stage starts from: a study copies these between runs that share them.
BEFORE_VAE = (BANK_FILE, BANK_PICTURE, PARSES_FILE, PARSES_PICTURE, PRIOR_SAMPLES_PICTURE)

# (path, what) -> (the file's size, modification time and inode, the value read).
_read_once: dict[tuple[str, str], tuple[tuple[int, int, int], Any]] = {}


def read_json(path: str) -> Any:
  """The JSON value in path; a RecordError naming the file when it does not parse.

  Every record (settings.json, config.json, eval.json, the lock record) is read
  here. A missing file raises FileNotFoundError, for the caller to explain.
  """
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return json.loads(data.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.RecordError(f'{path} is not a readable record ({e}).') from e


def _read_once_per_version(path: str, what: str, read: Callable[[], Any]) -> Any:
  """read(), reused while the file at path keeps its size, mtime and inode."""
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    _read_once.pop((path, what), None)
    return read()
  version = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
  cached = _read_once.get((path, what))
  if cached is not None and cached[0] == version:
    return cached[1]
  value = read()
  _read_once[(path, what)] = (version, value)
  return value


def _verified_arrays(path: str) -> dict[str, np.ndarray] | None:
  """The arrays of an artifact that reads back whole and matches its checksum;
  None (with a log line saying why) otherwise."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      arrays = {name: f[name] for name in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('%s is unreadable (%s); treating it as missing.', path, e)
    return None
  stored = arrays.pop(artifacts.CHECKSUM_KEY, None)
  if stored is None or 'settings' not in arrays:
    logging.warning(
      '%s has no checksum or settings (an earlier version wrote it); treating it as missing.',
      path,
    )
    return None
  if str(stored) != artifacts.checksum(arrays):
    logging.warning(
      '%s is corrupt: its arrays do not match the checksum stored at save; treating it as missing.',
      path,
    )
    return None
  return arrays


def artifact(workdir: str, name: str) -> dict[str, np.ndarray] | None:
  """The checked arrays of DIR/name ('settings' included), or None when it is
  missing or damaged; read once while the file is unchanged."""
  path = os.path.join(workdir, name)
  return _read_once_per_version(path, 'arrays', lambda: _verified_arrays(path))


def is_current(workdir: str, name: str, settings: dict) -> bool:
  """Whether DIR/name is an intact artifact made with exactly these settings."""
  arrays = artifact(workdir, name)
  if arrays is None:
    return False
  # Round-trip through JSON so tuples and lists compare alike.
  if json.loads(str(arrays['settings'])) == json.loads(artifacts.to_json(settings)):
    return True
  logging.info('%s was made with other settings.', os.path.join(workdir, name))
  return False


def save_bank(workdir: str, bank: partbank.PartBank) -> None:
  """Writes DIR/partbank.npz atomically, with its settings and checksum."""
  artifacts.save_npz(
    os.path.join(workdir, BANK_FILE),
    parts=bank.parts.astype(np.float32),
    counts=bank.counts,
    inertia=np.float64(bank.inertia),
    num_patches=np.int64(bank.num_patches),
    iterations=np.int64(bank.iterations),
    settings=np.asarray(artifacts.to_json(bank.settings)),
  )


def load_bank(workdir: str) -> partbank.PartBank:
  """The bank of DIR/partbank.npz; a MissingArtifactError when it is missing or damaged."""
  arrays = artifact(workdir, BANK_FILE)
  if arrays is None:
    raise errors.MissingArtifactError(
      f'{os.path.join(workdir, BANK_FILE)} is missing or damaged: run the bank stage '
      '(--stages=bank).'
    )
  return partbank.PartBank(
    parts=arrays['parts'],
    counts=arrays['counts'],
    inertia=float(arrays['inertia']),
    num_patches=int(arrays['num_patches']),
    iterations=int(arrays['iterations']),
    settings=json.loads(str(arrays['settings'])),
  )


def load_parses(workdir: str, split: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The arrays `keys` of one split ('train', 'test' or 'holdout') of DIR/parses.npz; a
  MissingArtifactError when it is missing or damaged."""
  arrays = artifact(workdir, PARSES_FILE)
  if arrays is None:
    raise errors.MissingArtifactError(
      f'{os.path.join(workdir, PARSES_FILE)} is missing or damaged: run the parse stage '
      '(--stages=parse).'
    )
  return {k: arrays[f'{split}_{k}'] for k in keys}
