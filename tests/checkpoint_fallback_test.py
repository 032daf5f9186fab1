"""checkpointing: a checkpoint step that cannot be restored is reported in one
warning line, moved aside, and the previous step restored instead.

Each test breaks a copy of real checkpoints (steps 10, 20, 30 and a best step
20, saved once by Checkpoints and BestCheckpoint): every kind of file Orbax
writes in a step folder, truncated to half, to nothing, or deleted.
"""

import contextlib
import glob
import logging
import os
import shutil
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, run_dir

STEPS = (10, 20, 30)
BEST_STEP, BEST_VALUE = 20, 1.0
# Random float32: 2,400 bytes that do not compress, so the array is stored in a
# data file (OCDBT keeps values under 1,024 bytes inside its b-tree nodes).
SIZE = 600
PROCESS_DATA = 'default/ocdbt.process_0/d/*'
# The kinds of file Orbax writes in a step folder, by what breaking them does.
READ = ('_CHECKPOINT_METADATA', 'default/_METADATA', 'default/manifest.ocdbt', 'default/d/*')
READ += (PROCESS_DATA,)
READ_WHEN_PRESENT = ('default/_sharding', 'default/array_metadatas/process_0')
NOT_READ = ('commit_success.txt', 'default/commit_success.txt')
NOT_READ += ('default/ocdbt.process_0/manifest.ocdbt',)
METRICS = ('metrics/metrics', 'metrics/commit_success.txt')  # A best step's too.
BREAKS = ('half', 'zero', 'delete')


def _state(step: int) -> dict:
  return {'w': jax.random.normal(jax.random.key(step), (SIZE,)), 'step': jnp.asarray(step)}


def _target() -> dict:
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {
    'w': jax.ShapeDtypeStruct((SIZE,), jnp.float32, sharding=device),
    'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=device),
  }


def _cases(kinds, breaks) -> list[tuple[str, str, str]]:
  """(test name, kind, break) of each kind broken each way."""
  return [
    (f'_{k}_{how}'.replace('/', '_').replace('*', 'all'), k, how) for k in kinds for how in breaks
  ]


def _kind(relative_path: str) -> str:
  """The file's kind: its path, with a data file's hashed name as '*'."""
  folder = os.path.dirname(relative_path)
  return f'{folder}/*' if os.path.basename(folder) == 'd' else relative_path


def _files(folder: str) -> list[str]:
  """Every file under folder, relative to it."""
  paths = glob.glob(os.path.join(folder, '**'), recursive=True)
  return sorted(os.path.relpath(p, folder) for p in paths if os.path.isfile(p))


def _break(step_dir: str, kind: str, how: str) -> None:
  """Truncates to half ('half'), to nothing ('zero') or deletes every file of the kind."""
  paths = glob.glob(os.path.join(step_dir, kind))
  assert paths, f'no {kind} in {step_dir}'
  for path in paths:
    if how == 'delete':
      os.remove(path)
    else:
      os.truncate(path, os.path.getsize(path) // 2 if how == 'half' else 0)


def _garble(step_dir: str) -> None:
  """Overwrites the array data with random bytes, keeping its size: every file
  is there and whole, but Orbax cannot decode the array."""
  path = max(glob.glob(os.path.join(step_dir, PROCESS_DATA)), key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(0).bytes(size))


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.records = []

  def emit(self, record):
    self.records.append(record)


@contextlib.contextmanager
def _absl_warnings():
  """The absl log records of level WARNING and above logged inside."""
  logger = logging.getLogger('absl')
  handler, level = _Records(), logger.level
  logger.addHandler(handler)
  logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
  try:
    yield handler.records
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


class FallbackTestCase(parameterized.TestCase):
  """Saves the checkpoints once; each test works on its own copy."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.template = os.path.join(tempfile.mkdtemp(), 'stage')
    checkpoints = checkpointing.Checkpoints(cls.template, {'shape': SIZE}, keep=3, every=10)
    best = checkpointing.BestCheckpoint(cls.template, 'nll')
    for step in STEPS:
      checkpoints.save(step, _state(step))
    best.update(BEST_STEP, _state(BEST_STEP), BEST_VALUE)
    best.close()
    checkpoints.close()
    cls.saved = {step: jax.tree.map(np.asarray, _state(step)) for step in STEPS}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(os.path.dirname(cls.template))
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    self.directory = os.path.join(workdir, 'stage')
    shutil.copytree(self.template, self.directory)

  def step_dir(self, step: int, best: bool = False) -> str:
    return os.path.join(self.directory, run_dir.BEST_DIR if best else '', str(step))

  def open(self, **kwargs) -> checkpointing.Checkpoints:
    checkpoints = checkpointing.Checkpoints(self.directory, {'shape': SIZE}, 3, 10, **kwargs)
    self.addCleanup(checkpoints.close)
    return checkpoints

  def open_best(self, **kwargs) -> checkpointing.BestCheckpoint:
    best = checkpointing.BestCheckpoint(self.directory, 'nll', **kwargs)
    self.addCleanup(best.close)
    return best

  def assert_state(self, restored: dict, want: dict) -> None:
    for key, value in want.items():
      self.assertEqual(restored[key].dtype, value.dtype)
      np.testing.assert_array_equal(np.asarray(restored[key]), value)

  def assert_no_warning(self, records) -> None:
    """Nothing logged by checkpointing, no error by anyone (Orbax warns of its
    read-only options)."""
    ours = [r for r in records if r.pathname == checkpointing.__file__]
    self.assertEqual([r.getMessage() for r in ours if r.levelno >= logging.WARNING], [])
    self.assertEqual([r.getMessage() for r in records if r.levelno > logging.WARNING], [])

  def assert_one_warning(self, records, step_dir: str, says: str) -> None:
    """One record names the step folder: a one-line warning containing `says`."""
    about = [r for r in records if step_dir + ' ' in r.getMessage()]
    self.assertLen(about, 1, [r.getMessage() for r in records])
    self.assertEqual(about[0].levelno, logging.WARNING)
    self.assertNotIn('\n', about[0].getMessage())
    self.assertIn(says, about[0].getMessage())

  def assert_moved_aside(self, step_dir: str, files: list[str], suffix='.unreadable') -> None:
    """The step folder is gone from Orbax's names and kept, as it was, beside them."""
    self.assertFalse(os.path.exists(step_dir))
    self.assertEqual(_files(step_dir + suffix), files)


class CheckpointsFallbackTest(FallbackTestCase):
  def test_orbax_writes_the_kinds_of_file_these_tests_break(self):
    kinds = {_kind(f) for f in _files(self.step_dir(30))}
    self.assertEqual(kinds, set(READ + READ_WHEN_PRESENT + NOT_READ))
    best_kinds = {_kind(f) for f in _files(self.step_dir(BEST_STEP, best=True))}
    self.assertEqual(best_kinds, set(READ + READ_WHEN_PRESENT + NOT_READ + METRICS))

  def test_intact_steps_restore_the_newest_exactly_without_a_warning(self):
    with _absl_warnings() as records:
      checkpoints = self.open()
      self.assertEqual(checkpoints.latest_step(), 30)
      self.assert_state(checkpoints.restore(_target()), self.saved[30])
    self.assert_no_warning(records)

  @parameterized.named_parameters(
    _cases(READ, BREAKS) + _cases(READ_WHEN_PRESENT, ('half', 'zero'))
  )
  def test_a_broken_file_falls_back_to_the_previous_step(self, kind, how):
    _break(self.step_dir(30), kind, how)
    files = _files(self.step_dir(30))
    with _absl_warnings() as records:
      checkpoints = self.open()
      self.assertEqual(checkpoints.latest_step(), 20)  # Known before restoring.
      self.assert_state(checkpoints.restore(_target()), self.saved[20])
      self.assertEqual(checkpoints.latest_step(), 20)
    self.assert_one_warning(records, self.step_dir(30), f'moved it to {self.step_dir(30)}.unread')
    self.assertEqual([r.getMessage() for r in records if r.levelno > logging.WARNING], [])
    self.assert_moved_aside(self.step_dir(30), files)

  @parameterized.named_parameters(_cases(NOT_READ, BREAKS) + _cases(READ_WHEN_PRESENT, ('delete',)))
  def test_a_file_restoring_does_not_read_leaves_the_step_in_use(self, kind, how):
    _break(self.step_dir(30), kind, how)
    with _absl_warnings() as records:
      checkpoints = self.open()
      self.assertEqual(checkpoints.latest_step(), 30)
      self.assert_state(checkpoints.restore(_target()), self.saved[30])
    self.assert_no_warning(records)
    self.assertFalse(glob.glob(self.step_dir(30) + '.*'))

  def test_an_empty_step_folder_falls_back(self):
    shutil.rmtree(self.step_dir(30))
    os.mkdir(self.step_dir(30))
    with _absl_warnings() as records:
      checkpoints = self.open()
      self.assertEqual(checkpoints.latest_step(), 20)
      self.assert_state(checkpoints.restore(_target()), self.saved[20])
    self.assert_one_warning(records, self.step_dir(30), '(the folder is empty)')
    self.assert_moved_aside(self.step_dir(30), [])

  def test_falls_back_past_every_broken_step_to_the_newest_intact_one(self):
    _break(self.step_dir(30), 'default/_METADATA', 'delete')
    _break(self.step_dir(20), PROCESS_DATA, 'half')
    files = {step: _files(self.step_dir(step)) for step in (20, 30)}
    with _absl_warnings() as records:
      checkpoints = self.open()
      self.assertEqual(checkpoints.latest_step(), 10)
      self.assert_state(checkpoints.restore(_target()), self.saved[10])
    for step in (20, 30):
      self.assert_one_warning(records, self.step_dir(step), 'moved it to')
      self.assert_moved_aside(self.step_dir(step), files[step])

  def test_a_step_orbax_fails_on_falls_back_when_restoring(self):
    _garble(self.step_dir(30))
    files = _files(self.step_dir(30))
    with _absl_warnings() as records:
      checkpoints = self.open()
      self.assertEqual(checkpoints.latest_step(), 30)  # Its files are all there and whole.
      self.assert_state(checkpoints.restore(_target()), self.saved[20])
      self.assertEqual(checkpoints.latest_step(), 20)
    self.assert_one_warning(records, self.step_dir(30), 'moved it to')
    self.assert_moved_aside(self.step_dir(30), files)

  def test_training_goes_on_after_a_fallback(self):
    _break(self.step_dir(30), 'default/manifest.ocdbt', 'zero')
    checkpoints = checkpointing.Checkpoints(self.directory, {'shape': SIZE}, 3, 10)
    checkpoints.restore(_target())
    checkpoints.save(30, _state(31))  # Trained again from step 20.
    checkpoints.close()
    reopened = self.open()
    self.assertEqual(reopened.latest_step(), 30)
    self.assert_state(reopened.restore(_target()), jax.tree.map(np.asarray, _state(31)))
    # The same step broken again is kept beside the first.
    _break(self.step_dir(30), 'default/manifest.ocdbt', 'delete')
    files = _files(self.step_dir(30))
    self.assert_state(self.open().restore(_target()), self.saved[20])
    self.assert_moved_aside(self.step_dir(30), files, suffix='.unreadable.2')
    self.assertTrue(os.path.isdir(self.step_dir(30) + '.unreadable'))

  def test_read_only_opening_skips_a_broken_step_in_place(self):
    _break(self.step_dir(30), 'default/d/*', 'half')
    with _absl_warnings() as records:
      checkpoints = self.open(read_only=True)
      self.assertEqual(checkpoints.latest_step(), 20)
      self.assert_state(checkpoints.restore(_target()), self.saved[20])
    self.assert_one_warning(records, self.step_dir(30), 'left in place (opened read-only)')
    self.assertTrue(os.path.isdir(self.step_dir(30)))
    self.assertFalse(glob.glob(self.step_dir(30) + '.*'))

  def test_a_step_that_cannot_be_moved_is_skipped(self):
    _break(self.step_dir(30), 'default/_METADATA', 'zero')
    with (
      _absl_warnings() as records,
      mock.patch('os.rename', side_effect=PermissionError(13, 'no')),
    ):
      checkpoints = self.open()
      self.assertEqual(checkpoints.latest_step(), 20)
      self.assert_state(checkpoints.restore(_target()), self.saved[20])
    self.assert_one_warning(records, self.step_dir(30), 'could not move it aside')
    self.assertTrue(os.path.isdir(self.step_dir(30)))

  @parameterized.named_parameters(('', False), ('_read_only', True))
  def test_with_no_step_usable_the_stage_stops_moving_nothing(self, read_only):
    for step in STEPS:
      _break(self.step_dir(step), 'default/_METADATA', 'half')
    with self.assertRaises(checkpointing.UnreadableCheckpointError) as raised:
      self.open(read_only=read_only)
    message = str(raised.exception)
    self.assertIsInstance(raised.exception, errors.UserError)
    self.assertNotIn('\n', message)
    self.assertIn(f'{self.directory} holds no checkpoint that can be restored', message)
    for step in STEPS:
      self.assertIn(f'step {step}: default/_METADATA is not valid JSON', message)
    self.assertEqual(
      sorted(glob.glob(os.path.join(self.directory, '*'))),
      sorted(
        [self.step_dir(s) for s in STEPS]
        + [os.path.join(self.directory, n) for n in (run_dir.BEST_DIR, run_dir.SETTINGS_FILE)]
      ),
    )

  def test_when_orbax_fails_on_every_step_the_stage_stops_moving_nothing(self):
    for step in STEPS:
      _garble(self.step_dir(step))
    checkpoints = self.open()
    with self.assertRaises(checkpointing.UnreadableCheckpointError) as raised:
      checkpoints.restore(_target())
    message = str(raised.exception)
    self.assertNotIn('\n', message)
    self.assertIn(f'{self.directory} holds no checkpoint that can be restored', message)
    self.assertIn('step 10: ValueError', message)
    for step in STEPS:
      self.assertTrue(os.path.isdir(self.step_dir(step)))
    self.assertEqual(checkpoints.latest_step(), 30)


class BestCheckpointFallbackTest(FallbackTestCase):
  @parameterized.named_parameters(_cases(READ + METRICS[:1], ('half', 'delete')))
  def test_a_broken_best_is_moved_aside_and_there_is_no_best(self, kind, how):
    best_dir = self.step_dir(BEST_STEP, best=True)
    _break(best_dir, kind, how)
    files = _files(best_dir)
    with _absl_warnings() as records:
      best = self.open_best()
    self.assertIsNone(best.best())
    self.assert_one_warning(records, best_dir, f'moved it to {best_dir}.unreadable')
    self.assert_moved_aside(best_dir, files)
    # The next held-out evaluation keeps its state as the best.
    self.assertTrue(best.update(30, _state(30), 2.0))
    best.close()
    reopened = self.open_best()
    self.assertEqual(reopened.best(), (30, 2.0))
    self.assert_state(reopened.restore(_target()), self.saved[30])

  def test_intact_best_restores_exactly(self):
    with _absl_warnings() as records:
      best = self.open_best(read_only=True)
      self.assertEqual(best.best(), (BEST_STEP, BEST_VALUE))
      self.assert_state(best.restore(_target()), self.saved[BEST_STEP])
    self.assert_no_warning(records)

  def test_read_only_opening_skips_a_broken_best_in_place(self):
    best_dir = self.step_dir(BEST_STEP, best=True)
    _break(best_dir, PROCESS_DATA, 'delete')
    with _absl_warnings() as records:
      best = self.open_best(read_only=True)
    self.assertIsNone(best.best())
    self.assert_one_warning(records, best_dir, 'left in place (opened read-only)')
    self.assertTrue(os.path.isdir(best_dir))

  def test_a_best_orbax_fails_on_is_one_line_error_moving_nothing(self):
    best_dir = self.step_dir(BEST_STEP, best=True)
    _garble(best_dir)
    best = self.open_best(read_only=True)
    self.assertEqual(best.best(), (BEST_STEP, BEST_VALUE))  # Its files are there and whole.
    with self.assertRaises(checkpointing.UnreadableCheckpointError) as raised:
      best.restore(_target())
    message = str(raised.exception)
    self.assertNotIn('\n', message)
    self.assertIn(f'The best checkpoint {best_dir} cannot be restored (ValueError: ', message)
    self.assertTrue(os.path.isdir(best_dir))


if __name__ == '__main__':
  absltest.main()
