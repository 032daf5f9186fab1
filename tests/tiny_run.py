"""One quickly trained tiny run per test process, shared by the tests that need
a finished run (the API's and the explorer's)."""

import functools
import tempfile

from configs import tiny
from experiments import launch

STAGES = ('bank', 'parse', 'prior', 'vae')


def config():
  """configs/tiny.py with a few training steps and no held-out split."""
  config = tiny.get_config()
  config.prior.train_steps = config.prior.eval_every = config.prior.checkpoint_every = 4
  config.vae.train_steps = config.vae.checkpoint_every = 4
  config.data.holdout_size = 0
  return config


@functools.cache
def trained_run() -> str:
  """A run directory with the stages bank, parse, prior and vae done (about 40 s)."""
  workdir = tempfile.mkdtemp(prefix='npdraw_tiny_run_')
  for stage in STAGES:
    launch.STAGES[stage](config(), workdir)
  return workdir
