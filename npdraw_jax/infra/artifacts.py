"""Stage artifacts: .npz files written atomically, tagged with their settings.

A stage is finished when its artifact exists, reads back whole and was made
with the settings the current configuration asks for (run_dir.is_current); an
interrupted write leaves no artifact. Each artifact stores the SHA-256 of its
arrays, computed at save, so that a damaged file (truncated, bytes flipped) is
found and treated as missing rather than read as data.
"""

import contextlib
import hashlib
import json
import os

import numpy as np

CHECKSUM_KEY = 'sha256'  # The array holding the checksum of the others.


def _write_atomically(path: str, mode: str, write) -> None:
  """write(file) into a temporary file renamed to path, so a crash leaves no half file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    # A full disk or an interrupted write: leave neither a half file nor the temporary.
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def checksum(arrays: dict[str, np.ndarray]) -> str:
  """SHA-256 hex digest of named arrays: names, dtypes, shapes and bytes, by name."""
  digest = hashlib.sha256()
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f'{name}|{array.dtype.str}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def save_npz(path: str, **arrays) -> None:
  """Writes arrays and their checksum to path atomically."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  arrays[CHECKSUM_KEY] = np.asarray(checksum(arrays))
  _write_atomically(path, 'wb', lambda f: np.savez(f, **arrays))


def save_json(path: str, record: dict) -> None:
  """Writes a JSON record to path atomically (indented, keys sorted)."""
  _write_atomically(path, 'w', lambda f: json.dump(record, f, indent=2, sort_keys=True))


def to_json(settings: dict) -> str:
  """The canonical text of a settings dict, as stored in artifacts."""
  return json.dumps(settings, sort_keys=True)
