"""Shared command line of the experiments: flags, stage checks, dispatch.

  python -m experiments.<dataset> --workdir=DIR [--config=FILE]
      [--config.FIELD=VALUE ...] [--stages=bank,parse,...]

The stages run in the order given; each skips itself when its artifact in DIR
is current for the configuration.
"""

import logging as python_logging
import os
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from npdraw_jax import evaluate, pipeline, train_prior, train_vae

# Stage name -> function(config, workdir). Later stages join as they land.
STAGES: dict[str, Callable] = {
  'bank': pipeline.run_bank,
  'parse': pipeline.run_parse,
  'prior': train_prior.train_and_evaluate,
  'vae': train_vae.train_and_evaluate,
  'eval': evaluate.run,
}
DEFAULT_STAGES = tuple(STAGES)


def check_stages(names: list[str]) -> list[str]:
  """Fails clearly on an unknown stage, before any work."""
  for name in names:
    if name not in STAGES:
      raise app.UsageError(f'Unknown stage {name!r}; stages: {",".join(STAGES)}.')
  if not names:
    raise app.UsageError('--stages is empty.')
  return names


class _QuietCheckpointer(python_logging.Filter):
  """Drops Orbax's per-save INFO lines; its warnings and errors still show."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname


def _hide_accelerators_from_tensorflow():
  """tf.data only feeds the host; without this TF grabs GPU memory."""
  import tensorflow as tf  # Imported here: only the tfds source needs it.

  tf.config.set_visible_devices([], 'GPU')


def prepare(config) -> None:
  """What every command does before its stages: quiet Orbax's per-save lines,
  keep TensorFlow off the accelerators, log the devices."""
  logging.get_absl_handler().addFilter(_QuietCheckpointer())
  if config.data.source == 'tfds':
    _hide_accelerators_from_tensorflow()
  logging.info(
    'JAX process %d of %d, %d local / %d global devices (%s).',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )


def run(config_name: str) -> None:
  """Defines the flags with configs/<config_name>.py as default and runs."""
  default_config = os.path.join(os.path.dirname(configs.__file__), f'{config_name}.py')
  config_flags.DEFINE_config_file('config', default_config, 'Configuration file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for artifacts and checkpoints.')
  flags.DEFINE_list('stages', list(DEFAULT_STAGES), 'Stages to run, in order.')
  flags.mark_flag_as_required('workdir')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    stages = check_stages(flags.FLAGS.stages)
    config = flags.FLAGS.config
    workdir = os.path.abspath(flags.FLAGS.workdir)
    prepare(config)
    os.makedirs(workdir, exist_ok=True)
    for name in stages:
      logging.info('=== Stage %s ===', name)
      STAGES[name](config, workdir)
    logging.info('Done: %s in %s.', ','.join(stages), workdir)

  app.run(main)
