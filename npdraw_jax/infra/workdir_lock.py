"""One run at a time in a workdir: an exclusive lock on DIR/.lock.

The lock is fcntl.flock on DIR/.lock, held for the life of the run. The OS
drops it when the process ends, even by kill -9, so a lock is never left
behind: the next run simply takes it. The file records the holder (pid, host,
start time) so that a refused run can say who holds the workdir; a run that
ends normally empties it, so a record found by the next run means that a
previous run ended without releasing it (killed or crashed), which is said.

flock works between hosts only on file systems that lock across hosts (NFS
with its lock manager does); where locking is not supported at all, the run
goes on with a warning.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import run_dir

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _read_record(fd: int) -> dict | None:
  """The holder recorded in the lock file; None when empty or half written."""
  text = os.pread(fd, 4096, 0)
  try:
    record = json.loads(text) if text else None
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


def _describe(record: dict | None) -> str:
  if record is None:
    return 'a process that has not yet recorded itself'
  return f'pid {record.get("pid")} on host {record.get("host")}, started {record.get("started")}'


class WorkdirLock:
  """The held lock of one workdir; release() (or process exit) frees it."""

  def __init__(self, fd: int | None, path: str):
    self._fd = fd
    self.path = path

  def release(self) -> None:
    """Empties the record (a clean end) and unlocks."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def acquire(workdir: str) -> WorkdirLock:
  """Takes the workdir's lock without waiting.

  Raises:
    errors.WorkdirLockedError: another live process holds it; the message
      names its pid, host and start time.
  """
  path = os.path.join(os.path.abspath(workdir), run_dir.LOCK_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    if e.errno not in _READ_ONLY:
      raise
    # Nothing can be written there, so no second run can change it either.
    logging.info('%s is read-only: no lock taken; only stages that read can run.', workdir)
    return WorkdirLock(None, path)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_record(fd)
    os.close(fd)
    pid = f' (kill {holder["pid"]})' if holder and 'pid' in holder else ''
    raise errors.WorkdirLockedError(
      f'{os.path.dirname(path)} is in use by another run: {_describe(holder)}. Wait for it to '
      f'end or stop it{pid}, or use another --workdir.'
    ) from None
  except OSError as e:
    if e.errno not in _UNSUPPORTED:
      raise
    os.close(fd)
    logging.warning(
      'Cannot lock %s (%s): this file system does not support locks, so nothing stops a '
      'second run in this workdir. Make sure there is only one.',
      path,
      e.strerror,
    )
    return WorkdirLock(None, path)
  previous = _read_record(fd)
  if previous is not None:
    logging.warning(
      'A previous run in %s (%s) ended without releasing it (killed or crashed); taking '
      'it over. Its checkpoints are resumed as usual.',
      os.path.dirname(path),
      _describe(previous),
    )
  record = {
    'pid': os.getpid(),
    'host': socket.gethostname(),
    'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
  }
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  return WorkdirLock(fd, path)


@contextlib.contextmanager
def held(workdir: str) -> Iterator[WorkdirLock]:
  """The workdir's lock for the duration of a with block."""
  lock = acquire(workdir)
  try:
    yield lock
  finally:
    lock.release()
