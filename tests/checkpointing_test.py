"""checkpointing.BestCheckpoint: the lowest value so far, kept across reopening."""

import os
import tempfile

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from npdraw_jax import checkpointing


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
    self.assertEqual(os.listdir(os.path.join(directory, checkpointing.BEST_DIR)), ['40'])
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


if __name__ == '__main__':
  absltest.main()
