"""Stage records against the settings a run asks for (issue 12, items 1, 5, 8).

The tests read a copy of the session's shared finished tiny run (tiny_run.py);
each test that changes a workdir works on a copy of its own. A few checks go
through the command line for the one-line message and exit status 2.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import tiny_run
from absl.testing import absltest

from npdraw_jax import errors, stages
from npdraw_jax.infra import checkpointing, run_dir, sharding
from npdraw_jax.stages import bank_parse, evaluate, train_prior, train_vae

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").

ALL_STAGES = ['bank', 'parse', 'prior', 'vae', 'eval']
_finished = None  # This module's copy of the shared finished run, made by setUpModule.


def setUpModule():
  global _finished
  _finished = tiny_run.copy()


def snapshot(directory: str) -> dict[str, tuple[float, str]]:
  """{relative path: (mtime, sha256)} of every file and directory under directory."""
  found = {}
  for parent, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(parent, name)
      digest = ''
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      found[os.path.relpath(path, directory)] = (os.path.getmtime(path), digest)
  return found


def without_lock(files: dict) -> dict:
  """A snapshot less the workdir lock, which every command takes."""
  return {k: v for k, v in files.items() if not k.startswith('.lock')}


def read_json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def run_cli(workdir: str, *flags: str) -> subprocess.CompletedProcess:
  return tiny_run.run(tiny_run.command(workdir, *flags), timeout=300)


class ChangedSettingsTest(absltest.TestCase):
  """Item 1: a stage's record holds its training settings; changes are refused
  before any work, or continued under explicitly and recorded."""

  def test_changed_beta_is_refused_before_any_work(self):
    before = snapshot(_finished)
    config = tiny_run.config(**{'vae.beta': 0.5})
    expected = 'vae.beta: recorded 1.0, requested 0.5'
    with self.assertRaisesRegex(checkpointing.ChangedSettingsError, expected):
      stages.check_before_work(config, _finished, ALL_STAGES)
    with self.assertRaisesRegex(checkpointing.ChangedSettingsError, expected):
      train_vae.train_and_evaluate(config, _finished)
    with self.assertRaisesRegex(checkpointing.ChangedSettingsError, expected):
      evaluate.run(config, _finished)
    self.assertEqual(snapshot(_finished), before)

  def test_command_line_refusal_is_one_line(self):
    before = snapshot(_finished)
    result = run_cli(_finished, '--config.vae.beta=0.5')
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    self.assertTrue(last.startswith('Error: '), last)
    self.assertIn('vae.beta: recorded 1.0, requested 0.5', last)
    self.assertIn('--allow_changed_settings', last)
    self.assertIn('--workdir', last)
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(without_lock(snapshot(_finished)), without_lock(before))

  def test_the_record_holds_the_training_settings(self):
    vae = read_json(_finished, 'vae', run_dir.SETTINGS_FILE)['training']
    config = tiny_run.config()
    for field in ('vae.beta', 'vae.lambda_sup', 'vae.lr', 'vae.where_gradient', 'prior.lr'):
      section, name = field.split('.')
      self.assertEqual(vae[field], config[section][name], field)
    self.assertEqual(vae['vae.train_steps'], 10)
    self.assertNotIn('vae.log_every', vae)
    self.assertNotIn('vae.checkpoint_every', vae)
    prior = read_json(_finished, 'prior', run_dir.SETTINGS_FILE)['training']
    self.assertEqual(prior['prior.train_steps'], 10)
    self.assertEqual(prior['prior.dropout'], config.prior.dropout)
    self.assertNotIn('vae.beta', prior)

  def test_continue_flag_trains_further_and_records_both(self):
    workdir = tiny_run.copy()
    changed = {'vae.beta': 0.5, 'vae.train_steps': 15}
    config = tiny_run.config(**changed)
    stages.check_before_work(config, workdir, ['vae'], allow_changed_settings=True)
    state = train_vae.train_and_evaluate(config, workdir, allow_changed_settings=True)
    self.assertEqual(int(state.step), 15)
    record = read_json(workdir, 'vae', run_dir.SETTINGS_FILE)
    self.assertEqual(record['training']['vae.beta'], 1.0)  # The original, kept.
    self.assertEqual(
      record['changes'],
      [
        {
          'step': 10,
          'fields': {
            'vae.beta': {'recorded': 1.0, 'requested': 0.5},
            'vae.train_steps': {'recorded': 10, 'requested': 15},
          },
        }
      ],
    )
    self.assertEqual(read_json(workdir, 'vae', run_dir.CONFIG_FILE)['vae']['beta'], 0.5)
    # The record now matches the new settings, and no longer the old ones.
    train_vae.check_recorded_settings(config, workdir)
    with self.assertRaisesRegex(checkpointing.ChangedSettingsError, 'recorded 0.5, requested 1.0'):
      train_vae.check_recorded_settings(tiny_run.config(), workdir)

  def test_shape_change_is_refused_even_with_the_flag(self):
    config = tiny_run.config(**{'model.encoder_features': 16})
    with self.assertRaisesRegex(
      checkpointing.IncompatibleCheckpointError, 'encoder_features: recorded 8, requested 16'
    ) as refused:
      stages.check_before_work(config, _finished, ['vae'], allow_changed_settings=True)
    self.assertNotIsInstance(refused.exception, checkpointing.ChangedSettingsError)

  def test_reading_a_stage_rewrites_no_record(self):
    workdir = tiny_run.copy()
    records = [
      os.path.join(stage, name)
      for stage in ('prior', 'vae')
      for name in (run_dir.SETTINGS_FILE, run_dir.CONFIG_FILE)
    ]
    before = snapshot(workdir)
    config = tiny_run.config()
    train_prior.restore_trained_params(config, workdir, sharding.make_mesh())
    train_vae.evaluated_checkpoint(config, workdir)
    train_prior.train_and_evaluate(config, workdir)  # Finished: trains no step.
    after = snapshot(workdir)
    self.assertEqual({k: after[k] for k in records}, {k: before[k] for k in records})


class DamagedArtifactsTest(absltest.TestCase):
  """Item 5: damaged artifacts are found and rebuilt."""

  def _copy_artifacts(self) -> str:
    workdir = tempfile.mkdtemp()
    for name in (run_dir.BANK_FILE, run_dir.PARSES_FILE):
      shutil.copy2(os.path.join(_finished, name), workdir)
    return workdir

  def test_truncated_partbank_is_rebuilt(self):
    workdir = self._copy_artifacts()
    path = os.path.join(workdir, run_dir.BANK_FILE)
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[: len(data) // 2])
    config = tiny_run.config()
    # The later stages say what to run instead of a BadZipFile.
    with self.assertRaisesRegex(errors.MissingArtifactError, 'run the bank and parse stages'):
      train_prior.load_parses(config, workdir, 'train')
    bank_parse.run_bank(config, workdir)
    with np.load(path) as rebuilt, np.load(os.path.join(_finished, run_dir.BANK_FILE)) as f:
      np.testing.assert_array_equal(rebuilt['parts'], f['parts'])
    self.assertTrue(bank_parse.is_current(config, workdir, 'bank'))

  def test_flipped_byte_in_parses_is_rebuilt(self):
    workdir = self._copy_artifacts()
    path = os.path.join(workdir, run_dir.PARSES_FILE)
    with open(path, 'rb') as f:
      data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    with open(path, 'wb') as f:
      f.write(bytes(data))
    config = tiny_run.config()
    self.assertFalse(bank_parse.is_current(config, workdir, 'parse'))
    bank_parse.run_parse(config, workdir)
    self.assertTrue(bank_parse.is_current(config, workdir, 'parse'))
    with np.load(path) as rebuilt, np.load(os.path.join(_finished, run_dir.PARSES_FILE)) as f:
      for name in f.files:
        np.testing.assert_array_equal(rebuilt[name], f[name], name)

  def test_changed_array_with_a_valid_zip_fails_the_checksum(self):
    # A file rewritten whole (its zip checks pass) with one value changed.
    workdir = self._copy_artifacts()
    path = os.path.join(workdir, run_dir.PARSES_FILE)
    with np.load(path) as f:
      arrays = dict(f)
    arrays['test_what'][0, 0] += 1
    np.savez(path, **arrays)
    with zipfile.ZipFile(path) as z:
      self.assertIsNone(z.testzip())
    self.assertFalse(bank_parse.is_current(tiny_run.config(), workdir, 'parse'))


class ReadOnlyTest(absltest.TestCase):
  """Item 5: reading commands write nothing; an upstream stage missing is said."""

  def test_eval_on_an_empty_workdir(self):
    workdir = tempfile.mkdtemp()
    config = tiny_run.config()
    with self.assertRaisesRegex(errors.MissingArtifactError, 'run the bank and parse stages'):
      evaluate.run(config, workdir)
    self.assertEqual(os.listdir(workdir), [])
    # Past the parses: the prior stage is named, still without a write.
    for name in (run_dir.BANK_FILE, run_dir.PARSES_FILE):
      shutil.copy2(os.path.join(_finished, name), workdir)
    before = snapshot(workdir)
    with self.assertRaisesRegex(errors.MissingArtifactError, 'run the prior stage'):
      evaluate.run(config, workdir)
    self.assertEqual(snapshot(workdir), before)

  def test_changed_bank_is_refused_before_the_bank_is_rebuilt(self):
    before = snapshot(_finished)
    config = tiny_run.config(**{'model.K': 12})
    for names in (ALL_STAGES, ['bank', 'parse']):
      with self.assertRaisesRegex(
        checkpointing.IncompatibleCheckpointError, 'K: recorded 16, requested 12'
      ):
        stages.check_before_work(config, _finished, names, allow_changed_settings=True)
    result = run_cli(_finished, '--config.model.K=12')
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertIn('recorded 16, requested 12', result.stderr.strip().splitlines()[-1])
    self.assertEqual(without_lock(snapshot(_finished)), without_lock(before))

  def test_eval_and_edit_on_a_read_only_run(self):
    workdir = tiny_run.copy()
    out = tempfile.mkdtemp()
    before = snapshot(workdir)
    script = (
      f'import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import tiny_run; '
      'from npdraw_jax.stages import evaluate; from experiments import launch, edit; '
      f'print("SUMMARY", evaluate.run(tiny_run.config(), {workdir!r})["nll_iwae"]); '
      f'sys.argv = ["edit", "--workdir={workdir}", "--a=0", "--b=1", "--region=top", '
      f'"--out={out}/edit.png"]; launch.run_app(edit.main, edit.define_flags)'
    )
    # Root writes through any mode bits (and this interpreter is root's alone),
    # so as root the snapshot below is the check; otherwise the run is made
    # unwritable too.
    as_root = os.geteuid() == 0
    if not as_root:
      subprocess.run(['chmod', '-R', 'a-w', workdir], check=True)
    try:
      result = tiny_run.run([sys.executable, '-c', script], timeout=300)
    finally:
      if not as_root:
        subprocess.run(['chmod', '-R', 'u+w', workdir], check=True)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    recorded = read_json(_finished, run_dir.EVAL_RECORD_FILE)['summary']
    self.assertIn(f'SUMMARY {recorded["nll_iwae"]}', result.stdout)
    self.assertTrue(os.path.exists(os.path.join(out, 'edit.png')))
    self.assertEqual(snapshot(workdir), before)


class EvalRecordTest(absltest.TestCase):
  """Item 8: an eval of the same checkpoint under the same settings is not repeated."""

  def test_second_eval_is_skipped_with_the_recorded_summary(self):
    workdir = tiny_run.copy()
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      metrics = f.read()
    test_lines = [
      json.loads(line) for line in metrics.splitlines() if json.loads(line)['stage'] == 'eval'
    ]
    self.assertLen(test_lines, 1)
    record = read_json(workdir, run_dir.EVAL_RECORD_FILE)
    self.assertEqual(record['checkpoint']['which'], 'last')
    self.assertEqual(record['checkpoint']['step'], 10)
    self.assertEqual(test_lines[0]['nll_iwae'], record['summary']['nll_iwae'])
    before = snapshot(workdir)
    summary = evaluate.run(tiny_run.config(), workdir)
    self.assertEqual(summary, record['summary'])
    self.assertEqual(snapshot(workdir), before)  # metrics.jsonl included: no line added.
    # Other eval settings or another checkpoint: not the recorded eval.
    other_config = tiny_run.config(**{'eval.iwae_samples': (1, 2)})
    chosen = train_vae.evaluated_checkpoint(other_config, workdir)
    other = evaluate.eval_record_key(other_config, workdir, chosen)
    self.assertNotEqual(other['settings'], record['settings'])
    self.assertEqual(other['checkpoint'], record['checkpoint'])


if __name__ == '__main__':
  absltest.main()
