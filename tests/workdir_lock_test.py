"""Tests for npdraw_jax.infra.workdir_lock, in one process: flock treats two open
files of one process as two holders, as it treats two processes.

tests/launch_test.py checks the same through the command line, with a
holder in another process killed by SIGKILL.
"""

import json
import os
import shutil
import socket
import tempfile

from absl.testing import absltest

from npdraw_jax import errors
from npdraw_jax.infra import run_dir, workdir_lock


class WorkdirLockTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir)
    self.path = os.path.join(self.workdir, run_dir.LOCK_FILE)

  def test_second_holder_is_refused_with_the_first_ones_pid_and_host(self):
    lock = workdir_lock.acquire(self.workdir)
    self.addCleanup(lock.release)
    with open(self.path) as f:
      record = json.load(f)
    self.assertEqual((record['pid'], record['host']), (os.getpid(), socket.gethostname()))
    with self.assertRaises(errors.WorkdirLockedError) as caught:
      workdir_lock.acquire(self.workdir)
    message = str(caught.exception)
    for needle in (self.workdir, f'pid {os.getpid()}', f'host {socket.gethostname()}'):
      self.assertIn(needle, message)
    self.assertIsInstance(caught.exception, errors.UserError)

  def test_release_frees_it_without_a_warning_for_the_next_run(self):
    with workdir_lock.held(self.workdir):
      pass
    self.assertEqual(os.path.getsize(self.path), 0)  # A clean end leaves no record.
    with self.assertNoLogs(level='WARNING'):
      workdir_lock.acquire(self.workdir).release()

  def test_lock_is_released_when_the_block_raises(self):
    with self.assertRaises(RuntimeError):
      with workdir_lock.held(self.workdir):
        raise RuntimeError('a failing stage')
    workdir_lock.acquire(self.workdir).release()

  def test_record_of_a_run_that_did_not_release_is_taken_over_with_a_warning(self):
    with open(self.path, 'w') as f:
      json.dump({'pid': 999999, 'host': 'elsewhere', 'started': 'yesterday'}, f)
    with self.assertLogs(level='WARNING') as logs:
      lock = workdir_lock.acquire(self.workdir)
    self.addCleanup(lock.release)
    self.assertTrue(
      any(
        'pid 999999 on host elsewhere' in line and 'without releasing' in line
        for line in logs.output
      ),
      logs.output,
    )
    with open(self.path) as f:
      self.assertEqual(json.load(f)['pid'], os.getpid())


if __name__ == '__main__':
  absltest.main()
