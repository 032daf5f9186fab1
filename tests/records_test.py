"""The run directory's records: JSON read through run_dir.read_json (one line
naming a broken file), metrics.jsonl kept readable and one line per (stage,
step, split), artifacts read once per version, and the stop signals.
"""

import json
import os
import signal
import tempfile

from absl.testing import absltest, parameterized

from npdraw_jax import errors
from npdraw_jax.infra import artifacts, interrupt, run_dir, training


class ReadJsonTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ('empty', b''),
    ('garbage', b'{"step": 3,'),
    ('undecodable', b'\xff\xfe{}'),
  )
  def test_a_broken_record_is_one_line_naming_the_file(self, content):
    path = os.path.join(tempfile.mkdtemp(), run_dir.SETTINGS_FILE)
    with open(path, 'wb') as f:
      f.write(content)
    with self.assertRaises(errors.RecordError) as raised:
      run_dir.read_json(path)
    message = str(raised.exception)
    self.assertIn(path, message)
    self.assertNotIn('\n', message)
    self.assertIsInstance(raised.exception, errors.UserError)

  def test_a_record_reads_back(self):
    path = os.path.join(tempfile.mkdtemp(), 'record.json')
    artifacts.save_json(path, {'b': [1, 2], 'a': 'é'})
    self.assertEqual(run_dir.read_json(path), {'a': 'é', 'b': [1, 2]})


def _lines(workdir: str) -> list[bytes]:
  with open(os.path.join(workdir, run_dir.METRICS_FILE), 'rb') as f:
    return f.read().splitlines()


class MetricsLogTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()

  def write_lines(self, *lines: bytes) -> None:
    with open(os.path.join(self.workdir, run_dir.METRICS_FILE), 'wb') as f:
      f.write(b''.join(line + b'\n' for line in lines))

  def test_unreadable_lines_are_dropped_with_a_warning(self):
    good = json.dumps({'stage': 'prior', 'step': 1, 'split': 'train', 'nll': 2.0}).encode()
    self.write_lines(good, b'\xff\xfe\x00garbage', b'{"stage": "prior", "st')
    log = training.MetricsLog(self.workdir, 'prior')
    with self.assertLogs(level='WARNING') as logs:
      log.drop_after(5)
    log.close()
    self.assertEqual(_lines(self.workdir), [good])
    self.assertLen([r for r in logs.records if 'unreadable line' in r.getMessage()], 2)

  def test_drop_repeats_keeps_the_last_line_of_each_step_and_split(self):
    record = lambda stage, step, value: json.dumps(
      {'stage': stage, 'step': step, 'split': 'test', 'nll': value}
    ).encode()
    self.write_lines(record('eval', 10, 1.0), record('vae', 10, 5.0), record('eval', 8, 2.0))
    log = training.MetricsLog(self.workdir, 'eval')
    log.write(10, 'test', {'nll': 3.0})  # Another eval of step 10: replaces the first.
    log.drop_repeats()
    log.close()
    self.assertEqual(
      [json.loads(line) for line in _lines(self.workdir)],
      [json.loads(r) for r in (record('vae', 10, 5.0), record('eval', 8, 2.0))]
      + [{'stage': 'eval', 'step': 10, 'split': 'test', 'nll': 3.0}],
    )


class ArtifactTest(absltest.TestCase):
  def test_read_once_while_unchanged_and_again_after_a_change(self):
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, run_dir.BANK_FILE)
    artifacts.save_npz(path, settings=json.dumps({'K': 1}), parts=[1.0])
    first = run_dir.artifact(workdir, run_dir.BANK_FILE)
    self.assertIs(run_dir.artifact(workdir, run_dir.BANK_FILE), first)  # Not read again.
    artifacts.save_npz(path, settings=json.dumps({'K': 2}), parts=[2.0, 3.0])
    second = run_dir.artifact(workdir, run_dir.BANK_FILE)
    self.assertEqual(second['parts'].tolist(), [2.0, 3.0])
    self.assertTrue(run_dir.is_current(workdir, run_dir.BANK_FILE, {'K': 2}))
    self.assertFalse(run_dir.is_current(workdir, run_dir.BANK_FILE, {'K': 1}))

  def test_a_damaged_artifact_is_missing(self):
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, run_dir.PARSES_FILE)
    artifacts.save_npz(path, settings=json.dumps({}), train_pres=[True])
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
    with self.assertLogs(level='WARNING'):
      self.assertIsNone(run_dir.artifact(workdir, run_dir.PARSES_FILE))
    with self.assertRaisesRegex(errors.MissingArtifactError, 'run the parse stage'):
      run_dir.load_parses(workdir, 'train', ('pres',))

  def test_a_failed_write_leaves_no_temporary_file(self):
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, run_dir.BANK_FILE)
    os.symlink('/dev/full', f'{path}.tmp')  # Writes there fail with ENOSPC.
    with self.assertRaises(OSError):
      artifacts.save_npz(path, settings='{}', parts=[1.0])
    self.assertEqual(os.listdir(workdir), [])


class StopSignalTest(parameterized.TestCase):
  @parameterized.parameters(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
  def test_the_first_signal_asks_for_a_stop_and_the_second_ends_the_process(self, signum):
    before = signal.getsignal(signum)
    with interrupt.handled():
      self.assertFalse(interrupt.requested())
      os.kill(os.getpid(), signum)
      self.assertTrue(interrupt.requested())
      self.assertEqual(interrupt.received(), signum)
      self.assertEqual(interrupt.exit_status(), 128 + signum)
      self.assertIs(signal.getsignal(signum), signal.SIG_DFL)  # The next one ends it.
      with self.assertRaisesRegex(errors.Interrupted, 'before stage vae; rerun'):
        interrupt.stop_if_requested('interrupted before stage vae')
    self.assertIs(signal.getsignal(signum), before)
    self.assertFalse(interrupt.requested())


if __name__ == '__main__':
  absltest.main()
