"""A finished run as Python objects: sample, encode, render, decode and edit drawings.

  import npdraw_jax
  run = npdraw_jax.load_run('runs/mnist')
  drawing = run.sample(4, seed=0)
  images = run.decode(drawing)

Arrays go in and out as NumPy, with the shapes, compilation and argument
checks of model/trained.py. Loading only reads the run's files (a run
directory the user cannot write loads), and not its data: only the test images
need the data, read at their first use.
"""

import functools
import os

import numpy as np

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, input_pipeline, run_dir, sharding
from npdraw_jax.model.trained import (
  MAX_BATCH,
  Drawing,
  Edited,
  Encoding,
  Frames,
  TrainedModel,
  check_integers,
)
from npdraw_jax.stages import bank_parse, train_vae

__all__ = ['MAX_BATCH', 'Drawing', 'Edited', 'Encoding', 'Frames', 'Run', 'load_run']


class Run(TrainedModel):
  """The trained networks, part bank and configuration of one run, with the
  run's test images.

  Build it with load_run(DIR), or from loaded pieces.

  Args:
    config, model, variables, parts: as for trained.TrainedModel.
    workdir: the run directory, for test images (None: none available).
  """

  def __init__(self, config, model, variables, parts, workdir: str | None = None):
    super().__init__(config, model, variables, parts)
    self.workdir = workdir

  # --- Test images --------------------------------------------------------------

  @functools.cached_property
  def _test_split(self) -> input_pipeline.Split:
    """The test split, read at the first use (a failure is not kept: a later use retries)."""
    if self.workdir is None:
      raise input_pipeline.DataError('This Run has no run directory, hence no test images.')
    try:
      return input_pipeline.load_split(self.config.data, 'test')
    except input_pipeline.DataError as e:
      raise input_pipeline.DataError(f"The run's test images cannot be read: {e}") from e

  @property
  def num_test_images(self) -> int:
    """Images in the run's test split; an input_pipeline.DataError (a
    ValueError) when its data cannot be read."""
    return self._test_split.num_examples

  def test_images(self, rows) -> np.ndarray:
    """The test images at rows [n] as the model sees them, [n, H, W, C].

    Each row is served alone, so an image (dynamically binarised or not) is
    the same whichever rows come with it.
    """
    if np.ndim(rows) > 1:
      raise ValueError(f'rows must be one integer or a list of them, got shape {np.shape(rows)}.')
    if np.ndim(rows) == 0:
      rows = np.atleast_1d(rows) if hasattr(rows, 'dtype') else [rows]
    rows = check_integers('rows', rows, 0, self.num_test_images)
    data, seed = self.config.data, self.config.seed
    images = [input_pipeline.examples_at(self._test_split, [r], data, seed)['image'] for r in rows]
    return np.concatenate(images) if images else np.zeros((0, *self.image_shape), np.float32)


def _require(path: str, stage: str) -> None:
  if not os.path.exists(path):
    raise errors.MissingArtifactError(f'{path} is missing: run the {stage} stage first.')


def load_run(workdir: str) -> Run:
  """The run in workdir, its stages bank, parse, prior and vae done.

  The configuration is the one the run wrote (DIR/vae/config.json); the VAE
  checkpoint is the one the eval stage uses. Only reads: a missing artifact is
  an errors.MissingArtifactError naming the stage to run.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise errors.MissingArtifactError(f'{workdir} is not a run directory (no such directory).')
  config = checkpointing.read_config(os.path.join(workdir, run_dir.VAE_DIR))
  bank = run_dir.load_bank(workdir)
  _require(os.path.join(workdir, run_dir.PARSES_FILE), 'parse')
  bank_parse.assume_recorded_data(config, workdir)  # Loading needs no data.
  _require(os.path.join(workdir, run_dir.PRIOR_DIR), 'prior')
  model, state = train_vae.restore_trained_model(config, workdir, sharding.make_mesh())
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return Run(config, model, variables, bank.parts, workdir)
