"""Suite-wide settings, read before any test module imports JAX.

The tests compile the same tiny programs many times over: in each pytest
worker and in every `python -m experiments...` subprocess they start. JAX's
persistent compilation cache, shared by all of them through the environment,
compiles each program once per machine (keyed by the program and the devices,
so it never serves a stale executable). Compiling, not running, dominates
these programs, so XLA's optimisation passes are off for every test process
(jax_disable_most_optimizations: the same values, to float rounding; the
heaviest in-process files run 1.6x faster).
"""

import os
import tempfile
import uuid

os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'npdraw_jax_test_xla_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import tiny_run  # noqa: E402  (after the settings: it imports the configs, which may import JAX)


def pytest_collection_modifyitems(items):
  """Files marked slow (minutes each) first: the two workers then end
  together, rather than one running a long file started last."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


def _is_worker(config) -> bool:
  return hasattr(config, 'workerinput')  # Set by pytest-xdist in its workers.


def pytest_configure(config):
  """Names the test session for the shared tiny run (tests/tiny_run.py); the
  xdist workers, started after this, inherit the name."""
  if not _is_worker(config):
    os.environ[tiny_run.SESSION_ENV] = uuid.uuid4().hex


def pytest_sessionfinish(session):
  """The shared tiny run goes once every worker is done with it."""
  if not _is_worker(session.config):
    tiny_run.remove_session_run()
