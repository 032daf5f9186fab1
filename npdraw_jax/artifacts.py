"""Stage artifacts: .npz files written atomically, tagged with their settings.

A stage is finished when its artifact exists and was made with the settings
the current configuration asks for; an interrupted write leaves no artifact.
"""

import json
import os

import numpy as np
from absl import logging


def _write_atomically(path: str, mode: str, write) -> None:
  """write(file) into a temporary file renamed to path, so a crash leaves no half file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, mode) as f:
    write(f)
  os.replace(tmp, path)


def save_npz(path: str, **arrays) -> None:
  """Writes arrays to path atomically."""
  _write_atomically(path, 'wb', lambda f: np.savez(f, **arrays))


def save_json(path: str, record: dict) -> None:
  """Writes a JSON record to path atomically (indented, keys sorted)."""
  _write_atomically(path, 'w', lambda f: json.dump(record, f, indent=2, sort_keys=True))


def to_json(settings: dict) -> str:
  """The canonical text of a settings dict, as stored in artifacts."""
  return json.dumps(settings, sort_keys=True)


def settings_of(path: str) -> dict | None:
  """The settings recorded in an artifact, or None when there is none."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      return json.loads(str(f['settings']))
  except (OSError, ValueError, KeyError) as e:
    logging.warning('Ignoring unreadable artifact %s: %s', path, e)
    return None


def is_current(path: str, settings: dict) -> bool:
  """Whether path holds an artifact made with exactly these settings."""
  found = settings_of(path)
  if found is None:
    return False
  # Round-trip through JSON so tuples and lists compare alike.
  if found == json.loads(to_json(settings)):
    return True
  logging.info('%s was made with other settings; rebuilding it.', path)
  return False
