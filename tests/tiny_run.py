"""One finished tiny run per test session, shared by the tests that need a
finished run (the API's, the explorer's, the stage records'), and the shorter
config of the tests that run whole studies (ablation, low data).

The first test process to ask builds it through the command line, every
stage, under a file lock; the others (pytest-xdist workers) wait for it.
Users only read it: a test that changes a run works on a copy (`copy`).
"""

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

import ml_collections

import npdraw_jax
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/tiny.py shortened further: compile time dominates anyway.
OVERRIDES = {
  'prior.train_steps': 10,
  'vae.train_steps': 10,
  'data.holdout_size': 0,
  'eval.authors_samples': 0,
}
# A study runs several pipelines: shorter still.
STUDY_OVERRIDES = {
  'prior.train_steps': 4,
  'prior.eval_every': 0,
  'prior.checkpoint_every': 4,
  'prior.num_samples': 2,
  'vae.train_steps': 4,
  'vae.checkpoint_every': 4,
  'partbank.max_iters': 5,
  'eval.iwae_samples': (1, 2),
  'eval.num_pictures': 2,
}
ENV = {'JAX_PLATFORMS': 'cpu'}
SESSION_ENV = 'NPDRAW_TEST_SESSION'


def _tiny_config(fields: dict):
  config = tiny.get_config()
  for field, value in fields.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


def config(**changes):
  """configs/tiny.py with OVERRIDES and then changes ({'vae.beta': 0.5})."""
  return _tiny_config({**OVERRIDES, **changes})


def study_config(**changes):
  """configs/tiny.py with STUDY_OVERRIDES and then changes."""
  return _tiny_config({**STUDY_OVERRIDES, **changes})


def command(workdir: str, *flags: str) -> list[str]:
  """The command line that runs the pipeline on workdir with OVERRIDES, then flags."""
  overrides = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  return [
    sys.executable,
    '-m',
    'experiments.mnist',
    f'--workdir={workdir}',
    '--config=configs/tiny.py',
    *overrides,
    *flags,
  ]


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  """Runs a command in the repository with ENV, capturing its text output."""
  return subprocess.run(
    args, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout
  )


def _session_workdir() -> str:
  # tests/conftest.py names the session; a process outside pytest is its own session.
  session = os.environ.get(SESSION_ENV, f'pid{os.getpid()}')
  return os.path.join(tempfile.gettempdir(), f'npdraw_tiny_run_{session}')


def remove_session_run() -> None:
  """Deletes this session's shared run, if it was built (at the session's end)."""
  workdir = _session_workdir()
  shutil.rmtree(workdir, ignore_errors=True)
  for marker in ('.done', '.lock'):
    with contextlib.suppress(FileNotFoundError):
      os.remove(workdir + marker)


def trained_run() -> str:
  """The shared run's directory: bank, parse, prior, vae and eval done (about 40 s, once)."""
  workdir = _session_workdir()
  with open(workdir + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(workdir + '.done'):
      result = run(command(workdir), timeout=600)
      assert result.returncode == 0, result.stderr[-3000:]
      open(workdir + '.done', 'w').close()  # noqa: SIM115
  return workdir


def without_data(run: npdraw_jax.Run) -> npdraw_jax.Run:
  """The run's networks and bank, with a data source that does not exist."""
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.data.source = f'folder:{os.path.join(tempfile.mkdtemp(), "moved")}'
  return npdraw_jax.Run(config, run.model, run.variables, run.parts, run.workdir)


def copy() -> str:
  """A copy of the shared run, for a test that changes it."""
  destination = os.path.join(tempfile.mkdtemp(), 'run')
  shutil.copytree(trained_run(), destination)
  return destination
