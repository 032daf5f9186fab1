"""A finished run as Python objects: sample, encode, render, decode and edit drawings.

  import npdraw_jax
  run = npdraw_jax.load_run('runs/mnist')
  drawing = run.sample(4, seed=0)
  images = run.decode(drawing)

Arrays go in and out as NumPy, with the shapes and compilation of
model/trained.py. Loading only reads the run's files.
"""

import functools
import os

import numpy as np

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, input_pipeline, run_dir, sharding
from npdraw_jax.model.trained import MAX_BATCH, Drawing, Edited, Encoding, Frames, TrainedModel
from npdraw_jax.stages import train_vae

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
    if self.workdir is None:
      raise ValueError('This Run has no run directory, hence no test images.')
    return input_pipeline.load_split(self.config.data, 'test')

  @property
  def num_test_images(self) -> int:
    """Images in the run's test split."""
    return self._test_split.num_examples

  def test_images(self, rows) -> np.ndarray:
    """The test images at rows [n] as the model sees them, [n, H, W, C].

    Each row is served alone, so an image (dynamically binarised or not) is
    the same whichever rows come with it.
    """
    rows = np.atleast_1d(np.asarray(rows))
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
      raise ValueError(f'rows must be integers, got {rows!r}.')
    data, seed = self.config.data, self.config.seed
    return np.concatenate(
      [input_pipeline.examples_at(self._test_split, [r], data, seed)['image'] for r in rows]
    )


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
  _require(os.path.join(workdir, run_dir.PRIOR_DIR), 'prior')
  model, state = train_vae.restore_trained_model(config, workdir, sharding.make_mesh())
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return Run(config, model, variables, bank.parts, workdir)
