"""Faults through the command line on the tiny config: a kill -9 soak, and a
training run that goes non-finite.

The soak kills the pipeline ten times at seeded random moments (during
imports, compilation, the bank and parse writes, training steps, checkpoint
saves, the eval) and then lets it finish; the result must be bit-identical
to an uninterrupted run's: the final parameters of both training stages and
every line of metrics.jsonl, each once.
"""

import json
import os
import signal
import subprocess
import sys
import time

import checkpoint_files
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # Minutes: started first (tests/conftest.py).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ('--config=configs/tiny.py',)
KILLS = 10
KILL_AFTER_S = (4.0, 14.0)  # Uniform: imports alone take about 5 s here.
RUN_TIMEOUT_S = 400


def _command(workdir: str, *flags: str) -> list[str]:
  return [sys.executable, '-m', 'experiments.mnist', f'--workdir={workdir}', *TINY, *flags]


def _env() -> dict[str, str]:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def soak(tmp_path_factory):
  """(reference workdir, soaked workdir, how many kills hit a running process)."""
  root = tmp_path_factory.mktemp('faults')
  reference, soaked = str(root / 'reference'), str(root / 'soaked')
  # One pipeline at a time: the kill times assume the machine is not shared.
  uninterrupted = subprocess.run(
    _command(reference), cwd=REPO, env=_env(), capture_output=True, text=True
  )
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  rng = np.random.default_rng(12)
  hits = 0
  for _ in range(KILLS):
    run = subprocess.Popen(_command(soaked), cwd=REPO, env=_env(), stderr=subprocess.DEVNULL)
    try:
      run.wait(timeout=rng.uniform(*KILL_AFTER_S))
    except subprocess.TimeoutExpired:
      run.send_signal(signal.SIGKILL)
      run.wait()
      hits += 1
  finish = subprocess.run(
    _command(soaked), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
  )
  assert finish.returncode == 0, finish.stderr[-3000:]
  return reference, soaked, hits


def test_every_kill_hit_a_running_pipeline(soak):
  assert soak[2] == KILLS


@pytest.mark.parametrize('stage', ['prior', 'vae'])
def test_soaked_run_ends_bit_identical(soak, stage):
  reference, soaked, _ = soak
  step, want = checkpoint_files.newest_state(os.path.join(reference, stage))
  got_step, got = checkpoint_files.newest_state(os.path.join(soaked, stage))
  assert got_step == step
  want_leaves = jax.tree_util.tree_leaves_with_path(want)
  got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
  assert len(want_leaves) == len(got_leaves)
  for path, value in want_leaves:
    np.testing.assert_array_equal(got_leaves[path], value, err_msg=jax.tree_util.keystr(path))


def test_soaked_metrics_are_the_true_history(soak):
  reference, soaked, _ = soak
  want, got = _metrics(reference), _metrics(soaked)
  keys = [(r['stage'], r['step'], r['split']) for r in got]
  assert len(keys) == len(set(keys))
  assert sorted(keys) == sorted((r['stage'], r['step'], r['split']) for r in want)
  by_key = {(r['stage'], r['step'], r['split']): r for r in got}
  for record in want:
    assert by_key[(record['stage'], record['step'], record['split'])] == record


def test_non_finite_training_stops_with_one_line_and_keeps_a_finite_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  start = time.monotonic()
  run = subprocess.run(
    _command(
      workdir,
      '--stages=bank,parse,prior',
      '--config.prior.lr=1e6',
      '--config.prior.warmup_steps=1',
      '--config.prior.log_every=1',
      '--config.prior.checkpoint_every=1',
      '--config.prior.eval_every=0',
    ),
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=RUN_TIMEOUT_S,
  )
  assert run.returncode == 2, run.stderr[-3000:]
  lines = run.stderr.strip().splitlines()
  assert lines[-1].startswith('Error: Stage prior: non-finite'), lines[-1]
  assert 'Traceback' not in run.stderr
  step, state = checkpoint_files.newest_state(os.path.join(workdir, 'prior'))
  assert f'step {step}, is kept' in lines[-1] or f'step {step} is kept' in lines[-1], lines[-1]
  for leaf in jax.tree.leaves(state):
    if np.issubdtype(np.asarray(leaf).dtype, np.floating):
      assert np.isfinite(leaf).all()
  assert time.monotonic() - start < RUN_TIMEOUT_S
