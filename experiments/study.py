"""What the study runners (low_data, ablation) share: runs recorded once.

A run ends by writing DIR/results.json (its record and configuration); a
rerun under the same configuration loads it instead of training, and an
interrupted run resumes from its artifacts and checkpoints.
"""

import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
from absl import logging

from configs import default
from experiments import launch
from npdraw_jax import errors, stages
from npdraw_jax.infra import artifacts, checkpointing, run_dir

RESULTS_FILE = 'results.json'
NPDRAW_STAGES = ('bank', 'parse', 'prior', 'vae', 'eval')


def is_recorded_config(recorded: dict, wanted: dict) -> bool:
  """Whether a run recorded under `recorded` ran the configuration `wanted` (both
  as JSON). A field added to the configs since the record was written, absent
  from it, matches when it holds its default (configs/default.py): the
  behaviour the run had, so finished runs are not redone for it."""
  recorded, wanted = checkpointing.flat_fields(recorded), checkpointing.flat_fields(wanted)
  defaults = checkpointing.flat_fields(json.loads(default.get_config().to_json_best_effort()))
  return all(
    recorded[k] == v if k in recorded else k in defaults and v == defaults[k]
    for k, v in wanted.items()
  ) and set(recorded) <= set(wanted)


def run_once(
  name: str,
  config: ml_collections.ConfigDict,
  directory: str,
  run_fn: Callable[[ml_collections.ConfigDict, str], dict],
) -> dict:
  """run_fn(config, directory)'s record, computed once per configuration.

  The record written to directory/results.json is run_fn's dict plus
  'seconds' (of the run that made it) and 'config'.
  """
  path = os.path.join(directory, RESULTS_FILE)
  wanted = json.loads(config.to_json_best_effort(sort_keys=True))
  record = None
  if os.path.exists(path):
    try:
      record = run_dir.read_json(path)
    except errors.RecordError as e:  # A cache of the results: recompute them.
      logging.warning('%s; rerunning.', e)
  if record is not None:
    if is_recorded_config(record['config'], wanted):
      logging.info('%s: results for this configuration exist in %s; skipping.', name, path)
      return record
    logging.info('%s: %s was made under another configuration; rerunning.', name, path)
  start = time.perf_counter()
  os.makedirs(directory, exist_ok=True)
  record = {**run_fn(config, directory), 'seconds': time.perf_counter() - start, 'config': wanted}
  if jax.process_index() == 0:
    artifacts.save_json(path, record)  # Whole or not at all: its presence means done.
  return record


def run_study(
  config: ml_collections.ConfigDict, workdir: str, run: Callable[[str], str], outputs: str
) -> None:
  """The shared start-up of a study's main: logs the devices, holds the workdir,
  runs run(workdir) -> its table and logs the table with the time taken."""
  launch.prepare(config)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  with launch.hold_workdir(workdir):
    table = run(workdir)
  logging.info(
    'Done in %.1f min: %s in %s.\n%s', (time.perf_counter() - start) / 60, outputs, workdir, table
  )


def training_length(max_steps: int, patience: int, watched: str = 'the held-out bound') -> str:
  """How long a model trains, for a study's text: 'N steps', or with early
  stopping 'up to N steps, stopping once <watched> has not improved ...'."""
  if patience == 0:
    return f'{max_steps:,} steps'
  return (
    f'up to {max_steps:,} steps, stopping once {watched} has not improved for {patience:,} steps'
  )


def evaluated_checkpoint_text(holdout_size: int) -> str:
  """Which checkpoint a study evaluates, for its text (as the eval stages choose it)."""
  if holdout_size == 0:
    return 'the last checkpoint is evaluated'
  return (
    f'the checkpoint with the best held-out bound ({holdout_size:,} training images held out) '
    'is evaluated'
  )


def steps_cell(summary: dict) -> str:
  """'E / T': the evaluated checkpoint's step and the steps trained, from an
  evaluation summary (evaluate.run's or baseline_vae.run_eval's)."""
  return f'{summary["evaluated_step"]} / {summary["trained_steps"]}'


def run_npdraw(config: ml_collections.ConfigDict, directory: str) -> dict[str, float]:
  """NP-DRAW's stages in order; returns the last one's (eval's) summary."""
  for name in NPDRAW_STAGES:
    logging.info('--- NP-DRAW stage %s ---', name)
    summary = stages.STAGES[name](config, directory)
  return summary
