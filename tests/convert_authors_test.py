"""npdraw_jax.convert_authors on a small experiment in the authors' release layout.

tests/data/authors_small/ was written once, with torch and the authors' code, by the
command in tests/authors_equivalence_test.py's docstring (benchmarks.authors_equivalence_torch
--small ... --network_outputs): their MNIST model at reduced widths (SMALL_WIDTHS) with
random weights and batch statistics, and in outputs.npz what their networks (on one fixed
input) and torch.load gave (benchmarks.authors_checkpoint's --outputs). No torch here.
"""

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from authors_fixture import FIXTURE, small_config

import npdraw_jax
from configs import mnist
from npdraw_jax import convert_authors
from npdraw_jax.model import npdraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = os.path.join(FIXTURE, 'exp', 'stoch_mnist', 'cat_vloc_at', '0208')
CHECKPOINT = os.path.join(EXPERIMENT, 'random_seed0_h8_p4x1', 'E00550.pth')
PRIOR_DIR = os.path.join(FIXTURE, 'exp', 'cnn_prior', 'mnist', '0208', 'random_seed0_h8_p4x1')


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def temporary_directory(test: absltest.TestCase) -> str:
  """A new directory, removed after the test."""
  directory = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
  return directory


class _Evil:
  """Pickles as a call of os.system (never called here: only its pickle is made)."""

  def __reduce__(self):
    return os.system, ('echo converted',)


def write_torch_zip(path: str, payload: bytes) -> None:
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', payload)
    archive.writestr('archive/version', '3\n')


class ReaderTest(absltest.TestCase):
  def test_reads_what_torch_load_read(self):
    saved = convert_authors.read_torch_file(CHECKPOINT)
    with np.load(os.path.join(FIXTURE, 'outputs.npz')) as f:
      checks = dict(f)
    state = saved['model']
    self.assertLen(state, int(checks['check_num_tensors']))
    for name, total, first, shape in zip(
      checks['check_names'],
      checks['check_sums'],
      checks['check_first'],
      checks['check_shapes'],
      strict=True,
    ):
      tensor = state[str(name)]
      self.assertEqual(','.join(map(str, tensor.shape)), str(shape), name)
      self.assertAlmostEqual(float(tensor.astype(np.float64).sum()), float(total), places=6)
      self.assertEqual(float(tensor.reshape(-1)[0]), float(first), name)
    self.assertEqual(saved['epo'], int(checks['check_epo']))
    self.assertEqual(saved['cfg'].prior_weight, str(checks['check_prior_weight']))
    self.assertEqual(saved['cfg']['vary_loc_vae']['nloc'], 36)
    self.assertEqual(set(saved['optim']), {'state', 'param_groups'})

  def test_refuses_a_pickle_naming_another_callable(self):
    path = os.path.join(temporary_directory(self), 'evil.pth')
    write_torch_zip(path, pickle.dumps({'model': _Evil()}, protocol=2))
    with self.assertRaisesRegex(
      convert_authors.AuthorsFormatError, r'names posix\.system|os\.system'
    ):
      convert_authors.read_torch_file(path)

  def test_refuses_files_that_are_not_torch_checkpoints(self):
    directory = temporary_directory(self)
    cases = {
      'text.pth': (b'hello', 'not a zip archive'),
      'legacy.pth': (pickle.dumps({'a': 1}, protocol=2), 'legacy'),
    }
    for name, (content, message) in cases.items():
      path = os.path.join(directory, name)
      with open(path, 'wb') as f:
        f.write(content)
      with self.assertRaisesRegex(convert_authors.AuthorsFormatError, message):
        convert_authors.read_torch_file(path)
    path = os.path.join(directory, 'other.zip')
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('readme.txt', 'no pickle')
    with self.assertRaisesRegex(convert_authors.AuthorsFormatError, 'not a torch checkpoint'):
      convert_authors.read_torch_file(path)


class ConvertTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.release = convert_authors.read_release(FIXTURE)
    cls.config = small_config()
    cls.model = npdraw.make_model(cls.config)
    cls.variables = convert_authors.convert_variables(cls.release.state, cls.model)
    with np.load(os.path.join(FIXTURE, 'outputs.npz')) as f:
      cls.theirs = dict(f)

  def test_finds_the_checkpoint_and_its_prior_folder(self):
    self.assertEqual(os.path.realpath(self.release.checkpoint), os.path.realpath(CHECKPOINT))
    self.assertEqual(os.path.realpath(self.release.prior_dir), os.path.realpath(PRIOR_DIR))
    self.assertEqual((self.release.epoch, self.release.best_epoch), (550, 549))
    convert_authors.check_config(self.release, self.config)  # Their settings fit.

  def _net(self, name):
    v = self.variables
    return {'params': v['params'][name], 'batch_stats': v['batch_stats'][name]}

  def test_encoder_gives_their_logits(self):
    q = self.model.encoder.apply(self._net('encoder'), self.theirs['images'], train=False)
    for name in ('what', 'where', 'pres'):
      self.assertLess(relative_error(q[name], self.theirs[f'encoder_{name}']), 1e-5, name)

  def test_decoder_gives_their_outputs(self):
    out = self.model.decoder.apply(self._net('decoder'), self.theirs['canvas'], train=False)
    self.assertLess(relative_error(out, np.moveaxis(self.theirs['decoder'], 1, -1)), 1e-5)

  def test_prior_gives_their_logits(self):
    steps = jnp.arange(self.config.model.T)
    theirs = self.theirs
    logits = self.model.prior.apply(
      {'params': self.variables['params']['prior']},
      theirs['prior_canvases'],
      theirs['prior_maps'],
      steps,
    )
    for name in ('what', 'where', 'pres'):
      self.assertLess(relative_error(logits[name], theirs[f'prior_{name}']), 1e-5, name)

  def test_part_bank_is_theirs_over_255(self):
    parts = convert_authors.read_part_bank(PRIOR_DIR, self.config)
    raw = np.load(os.path.join(PRIOR_DIR, 'patch_bank.npy'))
    self.assertEqual(parts.shape, (50, 5, 5, 1))
    np.testing.assert_allclose(parts, raw.reshape(parts.shape) / 255, rtol=1e-6)
    convert_authors.check_location_table(PRIOR_DIR, self.config)

  def test_output_channel_orders(self):
    order = convert_authors.output_channel_order
    np.testing.assert_array_equal(order('bernoulli', 1, 10), [0])
    # Theirs [C, 2] (mean, log-scale), ours [2, C].
    np.testing.assert_array_equal(order('logistic', 3, 10), [0, 2, 4, 1, 3, 5])
    mixture = order('mixture_logistic', 3, 10)
    self.assertCountEqual(mixture, range(100))
    # Ours: channel c's field f of component m at 10 + 30 c + 10 f + m; theirs 10 + 30 f + 3 m + c.
    self.assertEqual(mixture[10 + 30 * 2 + 10 * 1 + 4], 10 + 30 * 1 + 3 * 4 + 2)
    self.assertEqual(mixture[10 + 30 * 1 + 10 * 2 + 0], 10 + 30 * 2 + 1)

  def test_shapes_that_do_not_fit_fail_in_one_line(self):
    with self.assertRaisesRegex(convert_authors.ShapeMismatchError, 'model.encoder_features'):
      convert_authors.check_config(self.release, mnist.get_config())
    with self.assertRaisesRegex(convert_authors.ShapeMismatchError, 'do not fit'):
      convert_authors.convert_variables(
        self.release.state, npdraw.make_model(small_config(**{'model.decoder_features': 16}))
      )
    with self.assertRaisesRegex(convert_authors.ShapeMismatchError, 'layers.1'):
      convert_authors.convert_variables(
        self.release.state, npdraw.make_model(small_config(**{'prior.num_layers': 2}))
      )
    with self.assertRaisesRegex(convert_authors.ShapeMismatchError, 'patch_bank.npy'):
      convert_authors.read_part_bank(PRIOR_DIR, small_config(**{'model.K': 40}))

  def test_other_location_tables_fail(self):
    directory = temporary_directory(self)
    table = np.load(os.path.join(PRIOR_DIR, 'float_matrix.npy'))
    np.save(os.path.join(directory, 'float_matrix.npy'), table[:, ::-1])
    with self.assertRaisesRegex(convert_authors.ShapeMismatchError, 'location 0 is centred'):
      convert_authors.check_location_table(directory, self.config)


class ReleaseLayoutTest(absltest.TestCase):
  def test_missing_prior_folder_fails_clearly(self):
    directory = temporary_directory(self)
    shutil.copy(CHECKPOINT, directory)
    with self.assertRaisesRegex(convert_authors.AuthorsFormatError, 'prior folder.*--prior_dir'):
      convert_authors.read_release(directory)
    release = convert_authors.read_release(directory, prior_dir=PRIOR_DIR)  # The override.
    self.assertEqual(release.prior_dir, PRIOR_DIR)

  def test_several_checkpoints_need_a_choice(self):
    directory = temporary_directory(self)
    for name in ('E00500.pth', 'E00550.pth'):
      shutil.copy(CHECKPOINT, os.path.join(directory, name))
    with self.assertRaisesRegex(convert_authors.AuthorsFormatError, '--checkpoint'):
      convert_authors.find_checkpoint(directory)
    found = convert_authors.find_checkpoint(directory, 'E00500.pth')
    self.assertEqual(os.path.basename(found), 'E00500.pth')

  def test_command_line_error_is_one_line(self):
    bad = os.path.join(temporary_directory(self), 'bad.pth')
    with open(bad, 'w') as f:
      f.write('not torch')
    result = subprocess.run(
      [sys.executable, '-m', 'npdraw_jax.convert_authors', f'--authors_dir={bad}', '--workdir=/x'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
    )
    self.assertEqual(result.returncode, 2, result.stderr)
    lines = result.stderr.strip().splitlines()
    self.assertTrue(lines[-1].startswith('Error: ') and 'not a torch checkpoint' in lines[-1])


class RunDirectoryTest(absltest.TestCase):
  def test_converted_run_loads_as_a_finished_run(self):
    config = small_config(**{'data.source': 'embedded', 'data.holdout_size': 0})
    config.data.train_fraction = 0.02  # A quick parse stage (90 training images).
    config.vae.batch_size = 30
    workdir = os.path.join(temporary_directory(self), 'run')
    record = convert_authors.convert(FIXTURE, workdir, config)
    self.assertEqual(record['their_epoch'], 550)
    run = npdraw_jax.load_run(workdir)
    # Run keeps its variables private; the test compares them all.
    ours = jax.tree.leaves(
      convert_authors.convert_variables(
        convert_authors.read_release(FIXTURE).state, npdraw.make_model(config)
      )
    )
    loaded = jax.tree.leaves(run._variables)
    self.assertLen(loaded, len(ours))
    for a, b in zip(loaded, ours, strict=True):
      np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_allclose(run.parts, convert_authors.read_part_bank(PRIOR_DIR, config))
    with self.assertRaisesRegex(npdraw_jax.errors.ConfigError, 'new --workdir'):
      convert_authors.convert(FIXTURE, workdir, config)


if __name__ == '__main__':
  absltest.main()
