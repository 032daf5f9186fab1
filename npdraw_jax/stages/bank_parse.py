"""The non-parametric stages: part bank and parses, written under the workdir.

Each stage records the settings it ran with, a fingerprint of its data among
them; a rerun with the same settings and data skips it, and a changed setting,
changed data or a damaged file rebuilds it (and, through the recorded bank
settings, every parse made from the old bank).
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import artifacts, input_pipeline, pictures, run_dir
from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import parsing, partbank


def parse_splits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The splits the parse stage parses: the held-out images too when the
  prior watches its NLL on their parses (prior.patience > 0)."""
  return ('train', 'test') + (('holdout',) if config.prior.patience > 0 else ())


def bank_settings(config: ml_collections.ConfigDict) -> dict:
  """Everything the part bank depends on: the settings and the fingerprint of
  its data (not where the data is cached), and its own settings."""
  data = config.data.to_dict()
  data.pop('tfds_data_dir')
  # The prior and VAE checkpoints record it too (through parse_settings), so
  # they are refused, not reused, once the data has changed. A config that
  # carries one (assume_recorded_data: a finished run whose data is gone) is
  # taken at its word.
  if 'fingerprint' not in data:
    data['fingerprint'] = input_pipeline.data_fingerprint(config.data)
  bank = config.partbank.to_dict()
  bank.pop('chunk_size')  # Changes memory, not the result.
  return {
    'seed': config.seed,
    'data': data,
    'partbank': bank,
    'K': config.model.K,
    'patch_size': config.model.patch_size,
  }


def parse_settings(config: ml_collections.ConfigDict) -> dict:
  """Everything the parses depend on, the bank's settings included."""
  return {
    'bank': bank_settings(config),
    'order': config.parse.order,
    'threshold': config.parse.threshold,
    'T': config.model.T,
    'location_stride': config.model.location_stride,
  }


def is_current(config: ml_collections.ConfigDict, workdir: str, stage: str) -> bool:
  """Whether the artifact of stage 'bank' or 'parse' in workdir is intact and
  made under this configuration (so that running the stage writes nothing)."""
  name, settings = {
    'bank': (run_dir.BANK_FILE, bank_settings),
    'parse': (run_dir.PARSES_FILE, parse_settings),
  }[stage]
  if not run_dir.is_current(workdir, name, settings(config)):
    return False
  if stage == 'parse':
    # Parses of the same settings without a split now needed (the held-out
    # one): parsed again, the other splits to the same arrays.
    arrays = run_dir.artifact(workdir, name)
    missing = [split for split in parse_splits(config) if f'{split}_pres' not in arrays]
    if missing:
      logging.info('%s holds no parses of the %s split.', os.path.join(workdir, name), missing[0])
      return False
  return True


def _recorded_fingerprint(workdir: str, name: str) -> dict | None:
  """The data fingerprint recorded in DIR/name (the bank or the parses), if any."""
  arrays = run_dir.artifact(workdir, name)
  if arrays is None:
    return None
  settings = json.loads(str(arrays['settings']))
  if name == run_dir.PARSES_FILE:
    settings = settings.get('bank', {})
  return settings.get('data', {}).get('fingerprint')


def assume_recorded_data(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Lets a finished run be read when its data source cannot be: the data
  fingerprint recorded with its parses stands in for the data's (a warning
  says so). Does nothing when the source can be read. Only for reading the
  finished stages: a stage that needs the images still fails on them."""
  try:
    input_pipeline.data_fingerprint(config.data)
    return
  except input_pipeline.DataError as unreadable:
    recorded = _recorded_fingerprint(workdir, run_dir.PARSES_FILE)
    if recorded is None:
      raise
    logging.warning(
      '%s The run in %s is read as recorded, unchecked against its data.', unreadable, workdir
    )
  with config.unlocked():
    config.data.fingerprint = recorded


def _shown(value) -> str:
  """A fingerprint field in a log line; digests cut to their first 12 characters."""
  return f'{value[:12]}...' if isinstance(value, str) and len(value) > 16 else str(value)


def _log_data_change(config: ml_collections.ConfigDict, workdir: str, stage: str) -> None:
  """Says so when the stage's artifact in workdir was made from other data."""
  name = {'bank': run_dir.BANK_FILE, 'parse': run_dir.PARSES_FILE}[stage]
  recorded = _recorded_fingerprint(workdir, name)
  if recorded is None:
    return
  current = input_pipeline.data_fingerprint(config.data)
  if recorded != current:
    changes = '; '.join(
      f'{k} {_shown(recorded.get(k))} then, {_shown(current.get(k))} now'
      for k in sorted(set(recorded) | set(current))
      if recorded.get(k) != current.get(k)
    )
    logging.info(
      'Stage %s: %s was made from other data (%s); rebuilding it.',
      stage,
      os.path.join(workdir, name),
      changes,
    )


def build_bank(config: ml_collections.ConfigDict, images: np.ndarray) -> partbank.PartBank:
  """The part bank of training images [N, Hc, Wc, C] in [0, 1] under a configuration."""
  return partbank.build(
    images,
    num_parts=config.model.K,
    patch_size=config.model.patch_size,
    extract_stride=config.partbank.extract_stride,
    empty_threshold=config.partbank.empty_threshold,
    max_patches=config.partbank.max_patches,
    max_iters=config.partbank.max_iters,
    tol=config.partbank.tol,
    chunk_size=config.partbank.chunk_size,
    seed=config.seed,
    settings=bank_settings(config),
  )


def _canvas_images(split: input_pipeline.Split) -> np.ndarray:
  """[N, Hc, Wc, C] float32 in [0, 1]."""
  return split.canvas_images.astype(np.float32) / 255.0


def run_bank(config: ml_collections.ConfigDict, workdir: str) -> partbank.PartBank:
  """Builds DIR/partbank.npz (and partbank.png) unless it is current."""
  if is_current(config, workdir, 'bank'):
    logging.info('Stage bank: %s is current; skipping.', os.path.join(workdir, run_dir.BANK_FILE))
    return run_dir.load_bank(workdir)
  _log_data_change(config, workdir, 'bank')
  train = input_pipeline.load_split(config.data, 'train')
  logging.info('Stage bank: clustering patches of %d training images.', train.num_examples)
  start = time.perf_counter()
  bank = build_bank(config, _canvas_images(train))
  logging.info(
    'Stage bank: K=%d parts from %d patches, %d Lloyd iterations, inertia %.4g, %.1f s.',
    len(bank.parts),
    bank.num_patches,
    bank.iterations,
    bank.inertia,
    time.perf_counter() - start,
  )
  if jax.process_index() == 0:
    run_dir.save_bank(workdir, bank)
    # Parts are small: show them large, most used first.
    columns = int(np.ceil(np.sqrt(len(bank.parts))))
    picture = os.path.join(workdir, run_dir.BANK_PICTURE)
    pictures.save_grid(picture, bank.parts, columns, scale=8)
  return bank


def run_parse(config: ml_collections.ConfigDict, workdir: str) -> dict[str, np.ndarray]:
  """Parses the splits of parse_splits into DIR/parses.npz (and parses.png)
  unless current."""
  path = os.path.join(workdir, run_dir.PARSES_FILE)
  if is_current(config, workdir, 'parse'):
    logging.info('Stage parse: %s is current; skipping.', path)
    return run_dir.artifact(workdir, run_dir.PARSES_FILE)
  _log_data_change(config, workdir, 'parse')
  bank_path = os.path.join(workdir, run_dir.BANK_FILE)
  if not is_current(config, workdir, 'bank'):
    raise errors.MissingArtifactError(
      f'Stage parse needs the part bank of this configuration at {bank_path}: '
      'run the bank stage first (--stages=bank,parse).'
    )
  bank = run_dir.load_bank(workdir)
  grid = canvas_lib.grid_from_config(config)
  arrays = {}
  for name in parse_splits(config):
    split = input_pipeline.load_split(config.data, name)
    images = _canvas_images(split)
    start = time.perf_counter()
    parse = parsing.parse_images(
      grid,
      bank.parts,
      images,
      order=config.parse.order,
      num_steps=config.model.T,
      threshold=config.parse.threshold,
      batch_size=config.parse.batch_size,
      description=f'parse {name}',
    )
    logging.info(
      'Stage parse: %s, %d images in %.1f s; %.1f parts drawn per image, '
      'mean squared error %.3f per image.',
      name,
      split.num_examples,
      time.perf_counter() - start,
      parse.pres.sum(axis=1).mean(),
      parse.error.mean(),
    )
    arrays.update(
      {
        f'{name}_pres': parse.pres.astype(bool),
        f'{name}_where': parse.where.astype(np.int32),
        f'{name}_what': parse.what.astype(np.int32),
        f'{name}_index': split.index.astype(np.int64),
        f'{name}_error': parse.error.astype(np.float32),
      }
    )
    if name == 'test' and jax.process_index() == 0:
      picture = os.path.join(workdir, run_dir.PARSES_PICTURE)
      _save_parse_picture(picture, grid, bank, images, parse)
  if jax.process_index() == 0:
    settings = np.asarray(artifacts.to_json(parse_settings(config)))
    artifacts.save_npz(path, settings=settings, **arrays)
  return arrays


def _save_parse_picture(path, grid, bank, images, parse, count=32):
  """Test images (odd rows) above their rendered parses (even rows), spread
  evenly over the split so that every class shows when it is sorted."""
  columns = min(8, len(images))
  count = min(count, len(images)) // columns * columns
  chosen = np.linspace(0, len(images) - 1, count).astype(int)
  rendered = np.asarray(
    canvas_lib.render(grid, bank.parts, parse.pres[chosen], parse.where[chosen], parse.what[chosen])
  )
  rows = []
  for start in range(0, count, columns):
    rows += [images[chosen[start : start + columns]], rendered[start : start + columns]]
  pictures.save_grid(path, np.concatenate(rows), columns, scale=4)
