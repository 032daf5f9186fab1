"""checkpointing: the best checkpoint kept across reopening; the settings record."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, run_dir


def _state(step):
  return {'w': jnp.full((3,), float(step)), 'step': jnp.asarray(step)}


class BestCheckpointTest(absltest.TestCase):
  def test_keeps_the_lowest_value_and_survives_reopening(self):
    directory = tempfile.mkdtemp()
    best = checkpointing.BestCheckpoint(directory, 'nll')
    self.assertIsNone(best.best())
    values = {10: 5.0, 20: 3.0, 30: 4.0, 40: 2.5, 50: float('nan'), 60: 2.5}
    saved = {step: best.update(step, _state(step), value) for step, value in values.items()}
    self.assertEqual(saved, {10: True, 20: True, 30: False, 40: True, 50: False, 60: False})
    self.assertEqual(best.best(), (40, 2.5))
    best.close()

    # Reopened (a resumed run): the same best, and only it on disk.
    best = checkpointing.BestCheckpoint(directory, 'nll')
    self.assertEqual(best.best(), (40, 2.5))
    self.assertEqual(os.listdir(os.path.join(directory, run_dir.BEST_DIR)), ['40'])
    restored = best.restore({'w': jnp.zeros(3), 'step': jnp.asarray(0)})
    np.testing.assert_array_equal(restored['w'], [40.0] * 3)
    self.assertFalse(best.update(70, _state(70), 2.6))
    self.assertTrue(best.update(80, _state(80), 1.0))
    self.assertEqual(best.best(), (80, 1.0))
    best.close()

  def test_beside_the_periodic_checkpoints(self):
    directory = tempfile.mkdtemp()
    periodic = checkpointing.Checkpoints(directory, {'a': 1}, keep=2, every=10)
    best = checkpointing.BestCheckpoint(directory, 'nll')
    periodic.save(10, _state(10))
    best.update(10, _state(10), 1.0)
    periodic.save(20, _state(20))
    best.close()
    periodic.close()
    reopened = checkpointing.Checkpoints(directory, {'a': 1}, keep=2, every=10)
    self.assertEqual(reopened.latest_step(), 20)  # 'best' is not taken for a step.
    reopened.close()

  def test_restore_without_a_best(self):
    best = checkpointing.BestCheckpoint(tempfile.mkdtemp(), 'nll')
    with self.assertRaisesRegex(FileNotFoundError, 'No best checkpoint'):
      best.restore({'w': jnp.zeros(3)})
    best.close()


class SettingsRecordTest(absltest.TestCase):
  """The settings record: refused, allowed and recorded changes; read-only opening."""

  def _open(self, directory, lr, **kwargs):
    return checkpointing.Checkpoints(
      directory, {'shape': 3}, keep=2, every=10, training={'a.lr': lr}, **kwargs
    )

  def test_changed_training_is_refused_then_recorded_when_allowed(self):
    directory = tempfile.mkdtemp()
    self._open(directory, 0.1).close()
    path = os.path.join(directory, run_dir.SETTINGS_FILE)
    with open(path) as f:
      original = f.read()
    with self.assertRaisesRegex(
      checkpointing.ChangedSettingsError, r'a\.lr: recorded 0\.1, requested 0\.2'
    ):
      self._open(directory, 0.2)
    allowed = self._open(directory, 0.2, allow_changed_settings=True)
    with open(path) as f:
      self.assertEqual(f.read(), original)  # Nothing is recorded before training.
    allowed.record_training(30)
    allowed.close()
    record = checkpointing.read_record(directory)
    self.assertEqual(record['training'], {'a.lr': 0.1})
    self.assertEqual(
      record['changes'], [{'step': 30, 'fields': {'a.lr': {'recorded': 0.1, 'requested': 0.2}}}]
    )
    self.assertEqual(checkpointing.recorded_training(record), {'a.lr': 0.2})
    self._open(directory, 0.2).close()  # The new settings are now the record's.
    with self.assertRaises(checkpointing.IncompatibleCheckpointError):
      checkpointing.Checkpoints(
        directory, {'shape': 4}, 2, 10, training={'a.lr': 0.2}, allow_changed_settings=True
      )

  def test_a_setting_added_and_one_removed_are_recorded_as_changes(self):
    directory = tempfile.mkdtemp()
    self._open(directory, 0.1).close()
    training = {'a.lr': 0.1, 'a.decay': 0.5}  # a.decay is new.
    added = checkpointing.Checkpoints(
      directory, {'shape': 3}, 2, 10, training=training, allow_changed_settings=True
    )
    added.record_training(10)
    added.close()
    record = checkpointing.read_record(directory)
    self.assertEqual(record['changes'][-1]['fields'], {'a.decay': {'requested': 0.5}})
    self.assertEqual(checkpointing.recorded_training(record), training)
    removed = checkpointing.Checkpoints(
      directory, {'shape': 3}, 2, 10, training={'a.decay': 0.5}, allow_changed_settings=True
    )
    removed.record_training(20)
    removed.close()
    record = checkpointing.read_record(directory)
    self.assertEqual(record['changes'][-1]['fields'], {'a.lr': {'recorded': 0.1}})
    self.assertEqual(checkpointing.recorded_training(record), {'a.decay': 0.5})

  def test_a_resume_on_another_device_count_is_warned_about_and_recorded(self):
    directory = tempfile.mkdtemp()
    first = self._open(directory, 0.1)
    first.record_training(0)
    first.close()
    count = jax.device_count()
    self.assertEqual(checkpointing.read_record(directory)['devices'], [{'step': 0, 'count': count}])
    same = self._open(directory, 0.1)
    with self.assertNoLogs(level='WARNING'):
      same.record_training(10)  # The same devices: nothing to say or record.
    same.close()
    # As if trained on 3 more devices up to step 20.
    record = checkpointing.read_record(directory)
    record['devices'].append({'step': 20, 'count': count + 3})
    with open(os.path.join(directory, run_dir.SETTINGS_FILE), 'w') as f:
      json.dump(record, f)
    moved = self._open(directory, 0.1)  # The device count is not a restore setting.
    with self.assertLogs(level='WARNING') as logs:
      moved.record_training(30)
    moved.close()
    self.assertIn(
      f'was trained on {count + 3} devices up to step 30 and goes on on {count}', logs.output[0]
    )
    self.assertIn('not bit-identical', logs.output[0])
    self.assertEqual(
      checkpointing.read_record(directory)['devices'][-1], {'step': 30, 'count': count}
    )

  def test_read_only_opening_of_a_missing_stage_writes_nothing(self):
    workdir = tempfile.mkdtemp()
    with self.assertRaisesRegex(errors.MissingArtifactError, 'run the prior stage'):
      self._open(os.path.join(workdir, 'prior'), 0.1, read_only=True)
    self.assertEqual(os.listdir(workdir), [])

  def test_a_record_without_training_settings_gets_them_when_training(self):
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, run_dir.SETTINGS_FILE), 'w') as f:
      json.dump({'shape': 3}, f)  # As written before training settings were recorded.
    checkpoints = self._open(directory, 0.1)
    checkpoints.record_training(20)
    checkpoints.close()
    record = checkpointing.read_record(directory)
    self.assertEqual(record['training'], {'a.lr': 0.1})
    self.assertEqual(record['changes'][0]['step'], 20)
    with self.assertRaises(checkpointing.ChangedSettingsError):
      self._open(directory, 0.2)


if __name__ == '__main__':
  absltest.main()
