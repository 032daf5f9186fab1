"""Ctrl-C as a request to stop at the next safe point.

Python's own SIGINT handling raises KeyboardInterrupt wherever the main thread
happens to be: inside an XLA compilation that ends the process with a
segmentation fault, inside a training step it abandons the checkpoint being
written. Within `handled()`, the first SIGINT only sets a flag that the
training loop (after each step) and the launcher (between stages) check; they
save what is finished and raise errors.Interrupted. The handler then gives
SIGINT back to the operating system, so a second Ctrl-C ends the process at
once.

Each process sees only its own signals: in a run of several processes the
terminal's Ctrl-C reaches all of them, a signal sent to one process does not.
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from npdraw_jax import errors

_requested = threading.Event()


def request() -> None:
  """Asks the run to stop at its next check (what the first Ctrl-C does)."""
  _requested.set()


def requested() -> bool:
  """Whether a stop has been asked for since `handled()` was entered."""
  return _requested.is_set()


def stop_if_requested(before_stage: str) -> None:
  """Raises errors.Interrupted when a stop was asked for before a stage starts."""
  if requested():
    raise errors.Interrupted(f'interrupted before stage {before_stage}')


def _on_first_sigint(signum, frame) -> None:
  del signum, frame  # The handler's fixed signature.
  request()
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  sys.stderr.write(
    '\nCtrl-C: stopping after the current step (or stage) with what is saved; '
    'press Ctrl-C again to end at once.\n'
  )


@contextlib.contextmanager
def handled() -> Iterator[None]:
  """Within the block, SIGINT asks for a stop instead of raising
  KeyboardInterrupt. Enter it from the main thread (signal handlers live
  there). The previous handler is back, and the request cleared, afterwards."""
  _requested.clear()
  previous = signal.signal(signal.SIGINT, _on_first_sigint)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    _requested.clear()
