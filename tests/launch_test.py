"""Tests for experiments.launch: user errors end a command with one line and
status 2; one run at a time holds a workdir.

Each command runs as a subprocess of `python -m experiments.mnist` on
configs/tiny.py and fails before any training, so each takes seconds (most of
it importing). The two runs of a case (plain and --verbose) run at once.
"""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

from experiments import launch
from npdraw_jax.infra import run_dir

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 120


def _start(workdir: str, *args: str, env: dict | None = None) -> subprocess.Popen:
  command = [sys.executable, '-m', 'experiments.mnist', f'--workdir={workdir}']
  command += ['--config=configs/tiny.py', *args]
  # Only `env` may ask for tracebacks; TensorFlow's start-up lines are quieted.
  environ = {k: v for k, v in os.environ.items() if k != launch.VERBOSE_ENV}
  environ.update({'TF_CPP_MIN_LOG_LEVEL': '2', **(env or {})})
  return subprocess.Popen(
    command, cwd=_REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
  """(exit status, stderr)."""
  _, stderr = process.communicate(timeout=_TIMEOUT_S)
  return process.returncode, stderr


class UserErrorTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root)
    self.workdir = os.path.join(self.root, 'run')

  def assert_one_line_and_verbose(self, args: list[str], expected: str):
    """Plain: status 2, no traceback, exactly one 'Error:' line, the last, starting
    `expected`. With --verbose: status 2, a traceback, then the same line."""
    plain = _start(self.workdir, *args)
    verbose = _start(os.path.join(self.root, 'verbose'), *args, '--verbose')
    status, stderr = _finish(plain)
    self.assertEqual(status, 2, stderr)
    self.assertNotIn('Traceback', stderr)
    lines = stderr.strip().splitlines()
    self.assertEqual([line for line in lines if line.startswith('Error:')], lines[-1:], stderr)
    self.assertTrue(lines[-1].startswith(f'Error: {expected}'), lines[-1])
    status, stderr = _finish(verbose)
    self.assertEqual(status, 2, stderr)
    self.assertIn('Traceback', stderr)
    last = stderr.strip().splitlines()[-1]
    self.assertTrue(last.startswith(f'Error: {expected}'), last)

  def test_misspelt_config_field(self):
    self.assert_one_line_and_verbose(
      ['--config.model.KK=3'], "Unknown config field 'KK' in --config.model.KK."
    )

  def test_bad_stage_name(self):
    self.assert_one_line_and_verbose(['--stages=bank,vea'], "Unknown stage 'vea' in --stages")

  def test_missing_upstream_artifact(self):
    # The run with --verbose uses another workdir, so its message names that one.
    plain = _start(self.workdir, '--stages=vae')
    status, stderr = _finish(plain)
    self.assertEqual(status, 2, stderr)
    self.assertNotIn('Traceback', stderr)
    self.assertEqual(
      stderr.strip().splitlines()[-1],
      f'Error: {self.workdir}/parses.npz is missing or was made under other settings: run '
      'the bank and parse stages first (--stages=bank,parse).',
    )
    status, stderr = _finish(_start(self.workdir, '--stages=vae', env={launch.VERBOSE_ENV: '1'}))
    self.assertEqual(status, 2, stderr)
    self.assertIn('MissingArtifactError', stderr)  # In the traceback.
    self.assertFalse(os.path.exists(os.path.join(self.workdir, 'vae')))  # Nothing written.

  def test_folder_without_images(self):
    empty = os.path.join(self.root, 'no_images')
    os.makedirs(empty)
    self.assert_one_line_and_verbose(
      [f'--config.data.source=folder:{empty}', '--stages=bank'],
      f"data.source folder '{empty}' holds no .png/.jpg/.jpeg files.",
    )

  def test_edit_of_an_unfinished_run(self):
    command = [sys.executable, '-m', 'experiments.edit', f'--workdir={self.workdir}']
    process = subprocess.Popen(
      [*command, '--a=0', '--b=1', '--region=top'],
      cwd=_REPO,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    status, stderr = _finish(process)
    self.assertEqual(status, 2, stderr)
    self.assertNotIn('Traceback', stderr)
    self.assertEqual(
      stderr.strip().splitlines()[-1],
      f'Error: {self.workdir}/vae/config.json is missing: run the vae stage in '
      f'{self.workdir} first.',
    )

  def test_full_disk(self):
    # Writes into /dev/full fail with ENOSPC: the bank's temporary file is one.
    os.makedirs(self.workdir)
    os.symlink('/dev/full', os.path.join(self.workdir, 'partbank.npz.tmp'))
    status, stderr = _finish(_start(self.workdir, '--stages=bank'))
    self.assertEqual(status, 2, stderr)
    self.assertNotIn('Traceback', stderr)
    self.assertTrue(
      stderr.strip().splitlines()[-1].startswith('Error: The disk is full (No space left'), stderr
    )


# Holds the lock of the workdir argv[1] until killed, as a run does.
_HOLDER = (
  'import sys, time\n'
  'from npdraw_jax.infra import workdir_lock\n'
  'workdir_lock.acquire(sys.argv[1])\n'
  'print("held", flush=True)\n'
  'time.sleep(600)\n'
)


class WorkdirLockTest(absltest.TestCase):
  def test_held_workdir_stops_a_second_run_until_its_holder_dies(self):
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    holder = subprocess.Popen(
      [sys.executable, '-c', _HOLDER, workdir], cwd=_REPO, stdout=subprocess.PIPE, text=True
    )
    self.addCleanup(holder.kill)
    self.assertEqual(holder.stdout.readline().strip(), 'held')
    status, stderr = _finish(_start(workdir, '--stages=bank'))
    self.assertEqual(status, 2, stderr)
    self.assertNotIn('Traceback', stderr)
    last = stderr.strip().splitlines()[-1]
    self.assertTrue(last.startswith(f'Error: {workdir} is in use by another run'), last)
    self.assertIn(f'pid {holder.pid} on host {socket.gethostname()}', last)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'partbank.npz')))  # No work done.

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # The lock is free: the run passes it and stops at the missing parses instead.
    status, stderr = _finish(_start(workdir, '--stages=vae'))
    self.assertEqual(status, 2, stderr)
    self.assertIn(f'pid {holder.pid} on host', stderr)  # The take-over warning.
    self.assertIn('ended without releasing', stderr)
    self.assertIn('parses.npz is missing', stderr.strip().splitlines()[-1])
    self.assertEqual(os.path.getsize(os.path.join(workdir, run_dir.LOCK_FILE)), 0)


class MessageTest(absltest.TestCase):
  """Which exceptions are user errors; the others are bugs and keep their traceback."""

  def test_disk_full_anywhere_in_the_chain(self):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/w/prior/1/x')
    message = launch.user_error_message(full)
    self.assertIn('The disk is full', message)
    self.assertIn('/w/prior/1/x', message)
    try:
      try:
        raise full
      except OSError as e:
        raise RuntimeError('checkpoint save failed') from e
    except RuntimeError as wrapped:
      self.assertIn('The disk is full', launch.user_error_message(wrapped))
    # Writers that keep only the text of the OSError.
    self.assertIn(
      'disk is full', launch.user_error_message(ValueError('[28] No space left on device'))
    )

  def test_bugs_are_not_user_errors(self):
    for bug in (ValueError('x'), FileNotFoundError(2, 'No such file', '/a'), KeyError('k')):
      self.assertIsNone(launch.user_error_message(bug))

  def test_project_errors_are_one_line(self):
    from npdraw_jax import errors
    from npdraw_jax.infra import checkpointing, input_pipeline

    for error in (
      input_pipeline.DataError('bad\ndata'),
      checkpointing.IncompatibleCheckpointError('other settings'),
      errors.MissingArtifactError('DIR/partbank.npz is missing'),
    ):
      self.assertIsInstance(error, errors.UserError)
      self.assertEqual(launch.user_error_message(error), ' '.join(str(error).split('\n')))


if __name__ == '__main__':
  absltest.main()
