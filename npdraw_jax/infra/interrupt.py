"""Ctrl-C, SIGTERM and SIGHUP as a request to stop at the next safe point.

Python's own SIGINT handling raises KeyboardInterrupt wherever the main thread
happens to be: inside an XLA compilation that ends the process with a
segmentation fault, inside a training step it abandons the checkpoint being
written; SIGTERM (what SLURM and a preempted cloud VM send) and SIGHUP (a
closed terminal) end the process at once, losing every step since the last
checkpoint. Within `handled()`, the first of these signals only sets a flag
that the training loop (after each step), the eval stage (after each batch)
and the launcher (between stages) check; they save what is finished and raise
errors.Interrupted, and the launcher exits with the signal's conventional
status (128 + its number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
The handler then gives that signal back to the operating system, so a second
one ends the process at once.

Each process sees only its own signals: in a run of several processes the
terminal's Ctrl-C reaches all of them, a signal sent to one process does not.
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from npdraw_jax import errors

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_requested = threading.Event()
_received: list[signal.Signals] = []  # The signal that asked for the stop.


def request(signum: int = signal.SIGINT) -> None:
  """Asks the run to stop at its next check (what the first stop signal does)."""
  if not _requested.is_set():
    _received[:] = [signal.Signals(signum)]
  _requested.set()


def requested() -> bool:
  """Whether a stop has been asked for since `handled()` was entered."""
  return _requested.is_set()


def received() -> signal.Signals:
  """The signal that asked for the stop (SIGINT when request() was called without one)."""
  return _received[0] if _received else signal.SIGINT


def exit_status() -> int:
  """The shell's status of a command ended by the signal that asked for the stop."""
  return 128 + int(received())


def stop_if_requested(where: str) -> None:
  """Raises errors.Interrupted, saying where, when a stop was asked for."""
  if requested():
    raise errors.Interrupted(where)


def _on_first_signal(signum, frame) -> None:
  del frame  # The handler's fixed signature.
  request(signum)
  signal.signal(signum, signal.SIG_DFL)
  name = signal.Signals(signum).name
  again = 'press Ctrl-C again' if signum == signal.SIGINT else f'a second {name}'
  sys.stderr.write(
    f'\n{name}: stopping after the current step (or batch, or stage) with what is saved; '
    f'{again} to end at once.\n'
  )


@contextlib.contextmanager
def handled() -> Iterator[None]:
  """Within the block, SIGINT, SIGTERM and SIGHUP ask for a stop instead of
  ending the process. Enter it from the main thread (signal handlers live
  there). The previous handlers are back, and the request cleared, afterwards."""
  _requested.clear()
  _received.clear()
  previous = {signum: signal.signal(signum, _on_first_signal) for signum in STOP_SIGNALS}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    _requested.clear()
