"""training.train_loop: the NaN guard, the loss-explosion warning, Ctrl-C, and
metrics.jsonl as the true history across resumes.

The loop trains a linear regression (optax.sgd) with real Checkpoints in a
temporary directory; one run without stops is the reference the stopped and
resumed runs must reproduce. The last test interrupts the command line.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, interrupt, run_dir, sharding, training

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").

_NUM_STEPS = 20
_LOG_EVERY = 2
_SAVE_EVERY = 4
_EVAL_EVERY = 5
_TRUE_W = np.array([1.0, -2.0, 0.5], np.float32)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _init_state() -> training.TrainState:
  return training.TrainState.create(
    apply_fn=None,
    params={'w': jnp.zeros(3), 'b': jnp.zeros(())},
    tx=optax.sgd(0.1),
    rng=jax.random.key(0),
  )


def _batch_at(step: int) -> dict:
  x = np.random.default_rng(step).normal(size=(8, 3)).astype(np.float32)
  return {'x': x, 'y': x @ _TRUE_W + 0.3}


def _loss(params, batch):
  return jnp.mean((batch['x'] @ params['w'] + params['b'] - batch['y']) ** 2)


@jax.jit
def _sgd_step(state, batch):
  loss, grads = jax.value_and_grad(_loss)(state.params, batch)
  return state.apply_gradients(grads=grads), {'loss': loss}


def _evaluate(state) -> dict[str, float]:
  return {'loss': float(_loss(state.params, _batch_at(_NUM_STEPS + 1000)))}


def _open(directory: str) -> checkpointing.Checkpoints:
  return checkpointing.Checkpoints(
    os.path.join(directory, 'stage'), {'model': 'linear'}, keep=10, every=_SAVE_EVERY
  )


def _run(directory: str, train_step=_sgd_step) -> training.TrainState:
  """One run of the loop in `directory`, resuming from its newest checkpoint.

  Its checkpoints are closed however it ends, so a crash's save in flight
  lands before the next run looks (a killed process may lose it instead).
  """
  checkpoints = _open(directory)
  metrics_log = training.MetricsLog(directory, 'stage')
  try:
    state = training.restore_or_init(checkpoints, _init_state, sharding.make_mesh())
    if int(state.step) == 0:  # As the prior stage does: a line before training.
      metrics_log.write(0, 'test', {'baseline': 1.0})
    return training.train_loop(
      stage='stage',
      state=state,
      train_step=train_step,
      batch_at=_batch_at,
      num_steps=_NUM_STEPS,
      checkpoints=checkpoints,
      metrics_log=metrics_log,
      log_every=_LOG_EVERY,
      eval_every=_EVAL_EVERY,
      evaluate=_evaluate,
      description='a linear regression',
    )
  finally:
    checkpoints.close()
    metrics_log.close()


def _records(directory: str) -> list[dict]:
  with open(os.path.join(directory, run_dir.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _restore_latest(directory: str) -> training.TrainState:
  checkpoints = _open(directory)
  state = checkpoints.restore(training.abstract_state(_init_state, sharding.make_mesh()))
  checkpoints.close()
  return state


class _Crash(Exception):
  """A stand-in for a killed process."""


def _stepping_until(stop_step: int, action):
  """_sgd_step, but calling action() when it is to make step stop_step."""

  def train_step(state, batch):
    if int(state.step) + 1 == stop_step:
      action()
    return _sgd_step(state, batch)

  return train_step


class ReferenceRunTestCase(absltest.TestCase):
  """Tests against one uninterrupted run of `run_loop` (reference_dir,
  reference: its final state), each in a fresh `directory` of its own."""

  run_loop = staticmethod(_run)

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.reference_dir = tempfile.mkdtemp()
    cls.reference = cls.run_loop(cls.reference_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.reference_dir)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.directory)


class TrainLoopTest(ReferenceRunTestCase):
  def assert_same_params(self, state):
    for name in ('w', 'b'):
      np.testing.assert_array_equal(state.params[name], self.reference.params[name])

  def test_reference_run(self):
    # The regression is learnt (an independent check that the loop trains).
    self.assertEqual(int(self.reference.step), _NUM_STEPS)
    np.testing.assert_allclose(self.reference.params['w'], _TRUE_W, atol=0.2)
    keys = [(r['step'], r['split']) for r in _records(self.reference_dir)]
    expected = (
      [(0, 'test'), (1, 'train')]  # Orbax saves a run's first step, and saved steps log.
      + [(s, 'train') for s in range(_LOG_EVERY, _NUM_STEPS + 1, _LOG_EVERY)]
      + [(s, 'test') for s in range(_EVAL_EVERY, _NUM_STEPS + 1, _EVAL_EVERY)]
    )
    self.assertCountEqual(keys, expected)

  def test_update_to_nan_parameters_stops_before_saving(self):
    bad_step = 6  # A log step after the checkpoint of step 4.

    def train_step(state, batch):
      state, metrics = _sgd_step(state, batch)  # The loss (before the update) is finite.
      if int(state.step) == bad_step:
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
      return state, metrics

    with self.assertRaises(errors.NonFiniteError) as raised:
      _run(self.directory, train_step)
    message = str(raised.exception)
    self.assertIsInstance(raised.exception, errors.UserError)
    self.assertIn(f'non-finite parameters at step {bad_step};', message)
    self.assertIn('The last checkpoint, step 4, is kept', message)
    self.assertNotIn('loss', message.split(' at step')[0])
    # On disk: the finite steps 1 and 4 (its save waited for), not step 6.
    steps = sorted(int(s) for s in os.listdir(os.path.join(self.directory, 'stage')) if s.isdigit())
    self.assertEqual(steps, [1, 4])
    state = _restore_latest(self.directory)
    self.assertEqual(int(state.step), 4)
    self.assertTrue(all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)))
    self.assertNotIn(bad_step, [r['step'] for r in _records(self.directory)])

  def test_exploding_finite_loss_warns_once_per_explosion(self):
    exploding = {12, 14, 18}  # Two explosions: 12-14, then 18.

    def train_step(state, batch):
      state, _ = _sgd_step(state, batch)
      loss = 1e5 if int(state.step) in exploding else 2.0 + float(state.step) % 3
      return state, {'loss': jnp.float32(loss)}

    with self.assertLogs('absl', 'WARNING') as logs:
      _run(self.directory, train_step)
    warnings = [r.getMessage() for r in logs.records if 'diverging' in r.getMessage()]
    self.assertLen(warnings, 2, warnings)
    self.assertIn('at step 12,', warnings[0])
    self.assertIn('at step 18,', warnings[1])

  def test_history_after_crashes_and_an_interrupt_is_the_uninterrupted_one(self):
    def crash():
      raise _Crash()

    # 1: dies making step 1, before any checkpoint, after the line of step 0.
    with self.assertRaises(_Crash):
      _run(self.directory, _stepping_until(1, crash))
    self.assertEqual(
      _records(self.directory), [{'stage': 'stage', 'step': 0, 'split': 'test', 'baseline': 1.0}]
    )
    # 2: starts afresh, writes step 0 again; Ctrl-C at step 9 (leaving, the request clears).
    with interrupt.handled(), self.assertRaises(errors.Interrupted) as raised:
      _run(self.directory, _stepping_until(9, interrupt.request))
    self.assertEqual(raised.exception.step, 9)
    self.assertEqual(int(_restore_latest(self.directory).step), 9)
    # 3: resumes from 9, logs train steps 10, 12, 14, saves 12, dies making 15.
    with self.assertRaises(_Crash):
      _run(self.directory, _stepping_until(15, crash))
    self.assertIn(14, [r['step'] for r in _records(self.directory)])
    # 4: resumes from 12 and finishes.
    final = _run(self.directory)

    records = _records(self.directory)
    keys = [(r['stage'], r['step'], r['split']) for r in records]
    self.assertLen(set(keys), len(keys))
    self.assertCountEqual(records, _records(self.reference_dir))
    self.assert_same_params(final)

  def test_sigint_stops_after_the_step_with_it_saved(self):
    stop_step = 7  # Not a checkpoint step: saved because of the stop.
    handler_before = signal.getsignal(signal.SIGINT)
    with interrupt.handled():
      with self.assertRaises(errors.Interrupted) as raised:
        _run(
          self.directory, _stepping_until(stop_step, lambda: os.kill(os.getpid(), signal.SIGINT))
        )
      # A second Ctrl-C would end the process at once.
      self.assertIs(signal.getsignal(signal.SIGINT), signal.SIG_DFL)
    self.assertIs(signal.getsignal(signal.SIGINT), handler_before)
    self.assertEqual(raised.exception.step, stop_step)
    self.assertEqual(
      str(raised.exception),
      f'Stage stage: interrupted at step {stop_step}; rerun the same command to resume',
    )
    self.assertNotIsInstance(raised.exception, errors.UserError)
    self.assertEqual(int(_restore_latest(self.directory).step), stop_step)
    self.assert_same_params(_run(self.directory))
    self.assertCountEqual(_records(self.directory), _records(self.reference_dir))


class LaunchInterruptTest(absltest.TestCase):
  def test_ctrl_c_in_the_prior_stage(self):
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    command = [
      sys.executable,
      '-m',
      'experiments.mnist',
      f'--workdir={workdir}',
      '--config=configs/tiny.py',
      '--stages=bank,parse,prior',
      '--config.prior.eval_every=0',  # Saves compiling the evaluation.
    ]
    environ = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
    environ.pop('NPDRAW_VERBOSE', None)
    process = subprocess.Popen(
      command, cwd=_REPO, env=environ, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    stderr = []

    def read_stderr():
      for line in process.stderr:
        stderr.append(line)
        # The prior's first step compiles now: the Ctrl-C lands in compilation or training.
        if 'Stage prior: steps 0 -> ' in line:
          process.send_signal(signal.SIGINT)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    status = process.wait(timeout=300)
    reader.join()
    stderr = ''.join(stderr)
    self.assertEqual(status, 130, stderr)
    for crash in ('Traceback', 'Fatal Python error', 'Segmentation fault'):
      self.assertNotIn(crash, stderr)
    last = stderr.strip().splitlines()[-1]
    self.assertRegex(
      last, r'^SIGINT: Stage prior: interrupted at step \d+; rerun the same command to resume$'
    )
    step = int(last.split('at step ')[1].split(';')[0])
    self.assertTrue(os.path.isdir(os.path.join(workdir, 'prior', str(step))), stderr)

    # Resuming from it through the command line: tests/faults_test.py.


if __name__ == '__main__':
  absltest.main()
