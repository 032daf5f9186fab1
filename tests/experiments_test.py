"""Every stage end to end on the tiny CelebA-shaped config: tfds mock data and a
folder of JPEGs through the command line."""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl.testing import absltest
from PIL import Image, ImageSequence

from configs import tiny
from npdraw_jax import stages
from npdraw_jax.model.nets import inception
from npdraw_jax.stages import fid

pytestmark = pytest.mark.slow  # Minutes: started first (tests/conftest.py).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The tiny CelebA config holds out 64 images, as many as mock_data makes: hold
# out fewer here.
HOLDOUT_SIZE = 16


def records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def eval_record(workdir):
  (record,) = [r for r in records(workdir) if r['stage'] == 'eval']
  return record


def picture_size(columns, count, side, scale=2):
  rows = -(-count // columns)
  return (columns * (side + 1) + 1) * scale, (rows * (side + 1) + 1) * scale


class CelebaPipelineTest(absltest.TestCase):
  def check_outputs(self, workdir, config):
    record = eval_record(workdir)
    self.assertEqual(record['split'], 'test')
    largest = max(config.eval.iwae_samples)
    self.assertEqual(record['iwae_samples'], largest)
    self.assertEqual(record['nll_iwae'], record[f'nll_iwae_{largest}'])
    # log-mean-exp >= mean for every image: the IWAE bound is the tighter one.
    self.assertLessEqual(record['nll_iwae'], record['elbo'] + 1e-4)
    for s in config.eval.iwae_samples:
      self.assertAlmostEqual(
        record[f'bits_per_dim_{s}'], record[f'nll_iwae_{s}'] / (16 * 16 * 3 * np.log(2)), places=4
      )
      self.assertGreater(record[f'nll_iwae_{s}_stderr'], 0)
    count = config.eval.num_pictures
    with Image.open(os.path.join(workdir, 'samples.png')) as im:
      self.assertEqual(im.size, picture_size(8, 2 * count, 16))
    with Image.open(os.path.join(workdir, 'reconstructions.png')) as im:
      self.assertEqual(im.size, picture_size(9, 3 * count, 16))
    with Image.open(os.path.join(workdir, 'drawing.gif')) as im:
      self.assertEqual(im.size, picture_size(8, 2 * min(count, 8), 16))
      # Pillow merges repeated frames (undrawn steps) and adds up their times.
      durations = [frame.info['duration'] for frame in ImageSequence.Iterator(im)]
    self.assertEqual(sum(durations), 200 * (config.model.T - 1) + 2000)
    for name in ('partbank.npz', 'parses.npz', 'prior_samples.png', 'prior', 'vae'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    # The authors' estimate beside the bounds; the evaluated checkpoint is the
    # one with the best held-out bound, the only one in DIR/vae/best.
    authors = f'nll_authors_{config.eval.authors_samples}'
    self.assertTrue(np.isfinite(record[authors]))
    self.assertGreater(record[f'{authors}_stderr'], 0)
    holdout = [r for r in records(workdir) if r['split'] == 'holdout']
    self.assertEqual([r['holdout_images'] for r in holdout], [HOLDOUT_SIZE] * len(holdout))
    best = min(holdout, key=lambda r: r['nll_iwae'])
    self.assertEqual(os.listdir(os.path.join(workdir, 'vae', 'best')), [str(best['step'])])
    self.assertEqual(record['step'], best['step'])

  def test_all_stages_on_tfds_mock_data(self):
    # XLA's optimisations back on (tests/conftest.py turns them off): running
    # the FID Inception on 299x299 images dominates here, not compiling.
    flag = 'jax_disable_most_optimizations'
    self.addCleanup(jax.config.update, flag, jax.config.read(flag))
    jax.config.update(flag, False)
    config = tiny.get_config('celeba')
    workdir = tempfile.mkdtemp()
    # FID with a randomly initialised Inception: the pipeline, not the score.
    config.eval.fid_weights = os.path.join(workdir, 'inception.npz')
    variables = jax.jit(inception.FIDInceptionV3().init)(
      jax.random.key(0), jnp.zeros((1, 75, 75, 3))
    )
    fid.save_inception(config.eval.fid_weights, variables)
    config.eval.fid_samples = 16
    config.data.holdout_size = HOLDOUT_SIZE
    with tfds.testing.mock_data(num_examples=64):
      for stage in stages.DEFAULT_STAGES:
        stages.STAGES[stage](config, workdir)
    self.check_outputs(workdir, config)
    self.assertGreater(eval_record(workdir)['fid'], 0)

  def test_folder_of_jpegs_through_the_command_line(self):
    folder, workdir = tempfile.mkdtemp(), tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    for i in range(72):
      # Smooth colour blobs at CelebA's size, so the centre crop matters.
      y, x = np.mgrid[:218, :178] / 40.0
      phase = rng.uniform(0, 6, size=3)
      image = 127 + 120 * np.sin(y[..., None] + x[..., None] * 0.7 + phase)
      Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, f'{i:06d}.jpg'))
    result = subprocess.run(
      [
        sys.executable,
        '-m',
        'experiments.celeba',
        f'--workdir={workdir}',
        '--config=configs/tiny.py:celeba',
        f'--config.data.source=folder:{folder}',
        f'--config.data.holdout_size={HOLDOUT_SIZE}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-4000:])
    self.assertIn('FID skipped: eval.fid_weights is not set', result.stderr)
    self.assertIn('Using the VAE checkpoint with the best held-out bound', result.stderr)
    self.check_outputs(workdir, tiny.get_config('celeba'))
    self.assertNotIn('fid', eval_record(workdir))

    edit = [sys.executable, '-m', 'experiments.edit', f'--workdir={workdir}', '--a=0', '--b=3']
    result = subprocess.run(
      [*edit, '--region=top'], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    self.assertEqual(result.returncode, 0, result.stderr[-4000:])
    with Image.open(os.path.join(workdir, 'edit_0_3_top.png')) as im:
      self.assertEqual(im.size, picture_size(6, 6, 16, scale=4))
    result = subprocess.run(
      [*edit, '--region=0,0,99,4'], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('0 <= x0 <= x1 <= 16', result.stderr)


if __name__ == '__main__':
  absltest.main()
