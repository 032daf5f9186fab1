"""Early stopping on the held-out bound (vae.patience, baseline.patience) and
on the prior's held-out NLL (prior.patience).

References: hand-worked cases of the rule; for the loop, a scripted held-out
bound (the caller's evaluate) whose stop step is worked out by hand, and the
state of plain SGD steps run here; for stage 2 and the baseline, the
held-out lines they log, walked here to find the best check and the stop.
Stage 2, the baseline and the prior train a few steps, then go on at a
learning rate hundreds of times larger, which wrecks the model: the held-out
bound rises past the best and the run stops.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import tiny_run
import train_loop_test as loop
from absl.testing import absltest

from configs import tiny
from npdraw_jax import baseline_vae, errors
from npdraw_jax.infra import checkpointing, input_pipeline, interrupt, run_dir, sharding, training
from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import prior_likelihood
from npdraw_jax.model.nets import prior as prior_lib
from npdraw_jax.stages import bank_parse, evaluate, train_prior, train_vae


class StopRuleTest(absltest.TestCase):
  def test_stops_at_the_first_check_at_or_past_the_patience(self):
    # Checks every 100 steps, the best at step 200.
    for step, patience, stops in (
      (400, 300, False),  # 200 steps without a better bound: fewer than 300.
      (500, 300, True),  # 300: the first check past the patience.
      (400, 250, False),
      (500, 250, True),  # 300 >= 250: a patience between checks stops at the next one.
      (500, 0, False),  # 0: off.
      (200, 1, False),  # The best is this check.
    ):
      self.assertEqual(training.stops_early(step, 200, patience, 100), stops, (step, patience))

  def test_never_between_checks(self):
    # Step 470 is 270 steps past the best, but no check runs there (a run
    # interrupted there trains on to step 500, as the uninterrupted run does).
    self.assertFalse(training.stops_early(470, 200, 250, 100))

  def test_no_best_yet_counts_from_step_0(self):
    self.assertFalse(training.stops_early(5, None, 10, 5))
    self.assertTrue(training.stops_early(10, None, 10, 5))

  def test_finished_at_the_cap_or_stopped_early(self):
    self.assertTrue(training.is_finished(1000, 1000, 900, 0, 100))
    self.assertTrue(training.is_finished(600, 1000, 300, 300, 100))
    self.assertFalse(training.is_finished(600, 1000, 400, 300, 100))
    self.assertFalse(training.is_finished(650, 1000, 300, 300, 100))  # Between checks.
    self.assertFalse(training.is_finished(600, 1000, 300, 0, 100))


# The loop: the linear regression of tests/train_loop_test.py, checked every
# _EVAL_EVERY steps against this scripted held-out bound.
_EVAL_EVERY = 5
_PATIENCE = 7
_NUM_STEPS = 40
_SCRIPT = {5: 3.0, 10: 2.0, 15: 2.5, 20: 1.9, 25: 2.0, 30: 2.1, 35: 1.0, 40: 1.5}
# Worked out: the best is step 20's 1.9; step 25 is 5 steps past it, step 30
# 10 >= 7: the stop. Step 35's better bound is never reached.
_BEST, _STOP = 20, 30
_STOP_LINE = (
  f'Stage stage: stopped early at step {_STOP}: the held-out bound has not improved since '
  f'step {_BEST} (patience {_PATIENCE}).'
)


def _run(directory: str, train_step=loop._sgd_step) -> training.TrainState:
  """The loop in `directory` with early stopping, resuming from its newest checkpoint."""
  checkpoints = loop._open(directory)
  best = checkpointing.BestCheckpoint(os.path.join(directory, 'stage'), 'nll_iwae')
  metrics_log = training.MetricsLog(directory, 'stage')

  def scripted_evaluate(state):
    step = int(state.step)
    best.update(step, state, _SCRIPT[step])
    return {'nll_iwae': _SCRIPT[step]}

  try:
    state = training.restore_or_init(checkpoints, loop._init_state, sharding.make_mesh())
    return training.train_loop(
      stage='stage',
      state=state,
      train_step=train_step,
      batch_at=loop._batch_at,
      num_steps=_NUM_STEPS,
      checkpoints=checkpoints,
      metrics_log=metrics_log,
      log_every=loop._LOG_EVERY,
      eval_every=_EVAL_EVERY,
      evaluate=scripted_evaluate,
      description='a linear regression',
      eval_split='holdout',
      early_stop=training.held_out_stop(best, _PATIENCE, _EVAL_EVERY),
    )
  finally:
    best.close()
    checkpoints.close()
    metrics_log.close()


def _must_not_train(state, batch):
  raise AssertionError(f'trained a step from step {int(state.step)}')


def _messages(logs) -> list[str]:
  return [record.getMessage() for record in logs.records]


@pytest.mark.slow
class TrainLoopTest(loop.ReferenceRunTestCase):
  run_loop = staticmethod(_run)

  def test_stops_at_the_first_check_past_the_patience_with_that_step_saved(self):
    self.assertEqual(int(self.reference.step), _STOP)
    # _STOP plain SGD steps: no step more, none fewer.
    state = loop._init_state()
    for step in range(_STOP):
      state, _ = loop._sgd_step(state, loop._batch_at(step))
    for name in ('w', 'b'):
      np.testing.assert_array_equal(self.reference.params[name], state.params[name])
    # Saved: the newest checkpoint is the stop, the best is step _BEST.
    saved = loop._restore_latest(self.reference_dir)
    self.assertEqual(int(saved.step), _STOP)
    np.testing.assert_array_equal(saved.params['w'], state.params['w'])
    best = checkpointing.BestCheckpoint(
      os.path.join(self.reference_dir, 'stage'), 'nll_iwae', read_only=True
    )
    self.assertEqual(best.best(), (_BEST, _SCRIPT[_BEST]))
    best.close()
    held_out = [r['step'] for r in loop._records(self.reference_dir) if r['split'] == 'holdout']
    self.assertEqual(held_out, list(range(_EVAL_EVERY, _STOP + 1, _EVAL_EVERY)))

  def test_a_rerun_trains_no_further(self):
    shutil.copytree(self.reference_dir, self.directory, dirs_exist_ok=True)
    records = loop._records(self.directory)
    with self.assertLogs('absl', 'INFO') as logs:
      state = _run(self.directory, _must_not_train)
    self.assertEqual(int(state.step), _STOP)
    self.assertIn(_STOP_LINE, _messages(logs))
    self.assertEqual(loop._records(self.directory), records)

  def test_interrupted_between_checks_resumes_to_the_same_stop(self):
    # Step 27 is 7 steps past the best, but no check runs there: the resumed run
    # trains on to step 30 and stops there, as the uninterrupted one did.
    with interrupt.handled(), self.assertRaises(errors.Interrupted) as raised:
      _run(self.directory, loop._stepping_until(27, interrupt.request))
    self.assertEqual(raised.exception.step, 27)
    self.assertEqual(int(loop._restore_latest(self.directory).step), 27)
    with self.assertLogs('absl', 'INFO') as logs:
      final = _run(self.directory)
    self.assertIn(_STOP_LINE, _messages(logs))
    self.assertEqual(int(final.step), _STOP)
    for name in ('w', 'b'):
      np.testing.assert_array_equal(final.params[name], self.reference.params[name])
    self.assertCountEqual(loop._records(self.directory), loop._records(self.reference_dir))


def _held_out_lines(workdir: str, stage: str) -> list[dict]:
  with open(os.path.join(workdir, run_dir.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if r['stage'] == stage and r['split'] == 'holdout']


def _best_and_stop(
  lines: list[dict], patience: int, metric: str = 'nll_iwae'
) -> tuple[int, int | None]:
  """(the best check's step, the first check `patience` or more steps after the
  best so far: where the run must stop, or None) of logged held-out lines."""
  best_step, best_value = None, float('inf')
  for line in lines:
    if line[metric] < best_value:
      best_step, best_value = line['step'], line[metric]
    elif line['step'] - best_step >= patience:
      return best_step, line['step']
  return best_step, None


def _eval_lines(workdir: str, stage: str) -> list[dict]:
  with open(os.path.join(workdir, run_dir.METRICS_FILE)) as f:
    return [r for r in map(json.loads, f) if r['stage'] == stage]


@pytest.mark.slow
class Stage2Test(absltest.TestCase):
  def test_stops_early_and_the_eval_uses_the_best_checkpoint(self):
    # tiny's 64 held-out digits, a check every 2 steps; 4 steps at the usual rate.
    config = tiny_run.study_config(**{'vae.train_steps': 4, 'vae.checkpoint_every': 2})
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    bank_parse.run_bank(config, workdir)
    bank_parse.run_parse(config, workdir)
    train_prior.train_and_evaluate(config, workdir)
    train_vae.train_and_evaluate(config, workdir)
    # Then at 1,000 times the rate, up to 20 steps, stopping after 4 without a better bound.
    wrecking = tiny_run.study_config(
      **{
        'vae.train_steps': 20,
        'vae.checkpoint_every': 2,
        'vae.lr': 1.0,
        'vae.patience': 4,
      }
    )
    with self.assertLogs('absl', 'INFO') as logs:
      state = train_vae.train_and_evaluate(wrecking, workdir, allow_changed_settings=True)
    best, stop = _best_and_stop(_held_out_lines(workdir, 'vae'), patience=4)
    self.assertIsNotNone(stop, 'the held-out bound never stopped improving')
    self.assertEqual(int(state.step), stop)
    self.assertEqual(_held_out_lines(workdir, 'vae')[-1]['step'], stop)
    self.assertIn(
      f'Stage vae: stopped early at step {stop}: the held-out bound has not improved since '
      f'step {best} (patience 4).',
      _messages(logs),
    )
    # Finished for the eval stage, which evaluates the best checkpoint.
    self.assertEqual(
      train_vae.evaluated_checkpoint(wrecking, workdir),
      {'which': 'best', 'step': best, 'trained_steps': stop},
    )
    summary = evaluate.run(wrecking, workdir)
    self.assertEqual((summary['trained_steps'], summary['evaluated_step']), (stop, best))
    (line,) = _eval_lines(workdir, 'eval')
    self.assertEqual((line['step'], line['trained_steps']), (best, stop))
    record = run_dir.read_json(os.path.join(workdir, run_dir.EVAL_RECORD_FILE))
    self.assertEqual(record['summary']['trained_steps'], stop)
    # A rerun trains no further; without early stopping the run is unfinished.
    self.assertEqual(int(train_vae.train_and_evaluate(wrecking, workdir).step), stop)
    wrecking.vae.patience = 0
    with self.assertRaisesRegex(errors.MissingArtifactError, f'found: {stop}'):
      train_vae.evaluated_checkpoint(wrecking, workdir)


@pytest.mark.slow
class PriorTest(absltest.TestCase):
  def test_parses_the_held_out_images_stops_early_and_the_later_stages_use_the_best(self):
    # tiny's 64 held-out digits, a check every 5 steps, stopping at the first that
    # is not better; 10 steps at the usual rate.
    watching = {'prior.checkpoint_every': 10, 'prior.eval_every': 5, 'prior.patience': 5}
    config = tiny_run.study_config(**{'prior.train_steps': 10})
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    bank_parse.run_bank(config, workdir)
    before = bank_parse.run_parse(config, workdir)
    self.assertNotIn('holdout_pres', before)  # Parsed only when the prior watches them.
    config = tiny_run.study_config(**{'prior.train_steps': 10, **watching})
    self.assertFalse(bank_parse.is_current(config, workdir, 'parse'))
    after = bank_parse.run_parse(config, workdir)
    train_prior.train_and_evaluate(config, workdir)
    # Then at 300 times the rate, up to 60 steps.
    wrecking = tiny_run.study_config(**{'prior.train_steps': 60, 'prior.lr': 0.3, **watching})
    for key, value in before.items():  # The same settings: the same parses, and more.
      np.testing.assert_array_equal(after[key], value, err_msg=key)
    holdout = input_pipeline.load_split(wrecking.data, 'holdout')
    np.testing.assert_array_equal(after['holdout_index'], holdout.index)
    self.assertEqual(after['holdout_pres'].shape, (64, wrecking.model.T))
    with self.assertLogs('absl', 'INFO') as logs:
      state = train_prior.train_and_evaluate(wrecking, workdir, allow_changed_settings=True)
    lines = _held_out_lines(workdir, 'prior')
    best, stop = _best_and_stop(lines, patience=5, metric='nll')
    self.assertIsNotNone(stop, f'the held-out NLL never stopped improving: {lines}')
    self.assertEqual(int(state.step), stop)
    self.assertIn(
      f'Stage prior: stopped early at step {stop}: the held-out NLL has not improved since '
      f'step {best} (patience 5).',
      _messages(logs),
    )
    # The later stages get the best step's parameters: their held-out NLL, worked
    # out here, is the one logged at that step, not the stopped state's.
    mesh = sharding.make_mesh()
    params = train_prior.restore_trained_params(wrecking, workdir, mesh)
    grid = canvas_lib.grid_from_config(wrecking)
    model = prior_lib.make_prior(wrecking, grid.num_locations)
    parts = run_dir.load_bank(workdir).parts
    sequences = {k: after[f'holdout_{k}'] for k in train_prior.SEQUENCE_KEYS}
    logits = train_prior.teacher_forced_logits(model, params, grid, parts, sequences)
    log_probs = prior_likelihood.prior_sequence_log_prob(
      logits, *(sequences[k] for k in train_prior.SEQUENCE_KEYS)
    )
    logged = {line['step']: line['nll'] for line in lines}
    np.testing.assert_allclose(-np.mean(log_probs), logged[best], rtol=1e-5)
    self.assertGreater(logged[stop], logged[best] * (1 + 1e-3))
    # A rerun trains no further; without early stopping the prior is unfinished.
    self.assertEqual(int(train_prior.train_and_evaluate(wrecking, workdir).step), stop)
    wrecking.prior.patience = 0
    with self.assertRaisesRegex(errors.MissingArtifactError, f'found: {stop}'):
      train_prior.open_trained(wrecking, workdir, allow_changed_settings=True)


@pytest.mark.slow
class BaselineTest(absltest.TestCase):
  def test_stops_early_and_evaluates_the_best_checkpoint(self):
    config = tiny.get_config()  # 64 held-out digits.
    config.baseline.hidden = 100
    config.baseline.latent_dim = 10
    config.baseline.log_every = 50
    config.baseline.checkpoint_every = 50
    config.baseline.train_steps = 100
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    baseline_vae.train_and_evaluate(config, workdir)
    # Then at 300 times the rate, up to 300 steps, stopping after 100 without a better bound.
    config.baseline.lr = 0.3
    config.baseline.train_steps = 300
    config.baseline.patience = 100
    with self.assertLogs('absl', 'INFO') as logs:
      state = baseline_vae.train_and_evaluate(config, workdir)
    best, stop = _best_and_stop(_held_out_lines(workdir, 'baseline'), patience=100)
    self.assertIsNotNone(stop, 'the held-out bound never stopped improving')
    self.assertEqual(int(state.step), stop)
    self.assertIn(
      f'Stage baseline: stopped early at step {stop}: the held-out bound has not improved '
      f'since step {best} (patience 100).',
      _messages(logs),
    )
    self.assertEqual(int(baseline_vae.train_and_evaluate(config, workdir).step), stop)
    summary = baseline_vae.run_eval(config, workdir)
    self.assertEqual((summary['trained_steps'], summary['evaluated_step']), (stop, best))
    (line,) = _eval_lines(workdir, baseline_vae.EVAL_STAGE)
    self.assertEqual((line['step'], line['trained_steps']), (best, stop))
    config.baseline.patience = 0  # Without early stopping the run is unfinished.
    with self.assertRaisesRegex(FileNotFoundError, f'found: {stop}'):
      baseline_vae.run_eval(config, workdir)


if __name__ == '__main__':
  absltest.main()
