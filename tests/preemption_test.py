"""Preemption through the command line: SIGTERM (what SLURM and a preempted
cloud VM send) and SIGHUP (a closed terminal) stop a training stage as the
first Ctrl-C does, with the step in progress saved, the lock released, one line
and the signal's exit status; the rerun ends bit-identical to an uninterrupted
run. A Ctrl-C during the eval stage stops it with nothing recorded.
"""

import json
import os
import shutil
import signal
import subprocess
import threading

import checkpoint_files
import jax
import numpy as np
import pytest
import tiny_run

from npdraw_jax.infra import run_dir

pytestmark = pytest.mark.slow  # Two command lines per test.


def _stopped_by(signum: int, workdir: str, when: str, *flags: str) -> tuple[int, str]:
  """Runs the tiny pipeline on workdir and sends `signum` once stderr shows
  the line `when`; (exit status, stderr)."""
  process = subprocess.Popen(
    tiny_run.command(workdir, *flags),
    cwd=tiny_run.REPO,
    env={**os.environ, **tiny_run.ENV, 'TF_CPP_MIN_LOG_LEVEL': '2'},
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )
  lines = []

  def read_stderr():
    for line in process.stderr:
      lines.append(line)
      if when in line:
        process.send_signal(signum)

  reader = threading.Thread(target=read_stderr)
  reader.start()
  status = process.wait(timeout=300)
  reader.join()
  return status, ''.join(lines)


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, run_dir.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _without_stages(workdir: str, stages: tuple[str, ...]) -> None:
  """Removes what `stages` wrote from a copy of the finished tiny run."""
  lines = [r for r in _metrics(workdir) if r['stage'] not in stages]
  with open(os.path.join(workdir, run_dir.METRICS_FILE), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in lines)
  if 'vae' in stages:
    shutil.rmtree(os.path.join(workdir, run_dir.VAE_DIR))
  os.remove(os.path.join(workdir, run_dir.EVAL_RECORD_FILE))


def _assert_same_newest_state(got_dir: str, want_dir: str) -> None:
  want_step, want = checkpoint_files.newest_state(want_dir)
  got_step, got = checkpoint_files.newest_state(got_dir)
  assert got_step == want_step
  got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
  for path, value in jax.tree_util.tree_leaves_with_path(want):
    np.testing.assert_array_equal(got_leaves[path], value, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP])
def test_signal_saves_the_step_and_the_rerun_is_bit_identical(signum):
  finished = tiny_run.trained_run()
  workdir = tiny_run.copy()
  _without_stages(workdir, ('vae', 'eval'))

  status, stderr = _stopped_by(signum, workdir, 'Stage vae: steps 0 -> ', '--stages=vae')

  assert status == 128 + signum, stderr
  for crash in ('Traceback', 'Fatal Python error', 'Segmentation fault'):
    assert crash not in stderr
  last = stderr.strip().splitlines()[-1]
  name = signal.Signals(signum).name
  assert last.startswith(f'{name}: Stage vae: interrupted at step '), last
  step = int(last.split('at step ')[1].split(';')[0])
  assert 0 < step < tiny_run.OVERRIDES['vae.train_steps']
  assert os.path.isdir(os.path.join(workdir, run_dir.VAE_DIR, str(step)))
  assert os.path.getsize(os.path.join(workdir, run_dir.LOCK_FILE)) == 0  # Released.
  assert not [name for name in os.listdir(workdir) if 'tmp' in name]

  rerun = tiny_run.run(tiny_run.command(workdir, '--stages=vae'), timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  _assert_same_newest_state(
    os.path.join(workdir, run_dir.VAE_DIR), os.path.join(finished, run_dir.VAE_DIR)
  )
  want = [r for r in _metrics(finished) if r['stage'] == 'vae']
  assert [r for r in _metrics(workdir) if r['stage'] == 'vae'] == want


def test_ctrl_c_during_eval_records_nothing():
  finished = tiny_run.trained_run()
  workdir = tiny_run.copy()
  _without_stages(workdir, ('eval',))
  before = _metrics(workdir)

  # The line comes before the checkpoint's restore and the eval's compilation.
  status, stderr = _stopped_by(signal.SIGINT, workdir, '=== Stage eval ===', '--stages=eval')

  assert status == 130, stderr
  assert stderr.strip().splitlines()[-1].startswith('SIGINT: Stage eval'), stderr[-2000:]
  assert 'nothing recorded' in stderr.strip().splitlines()[-1]
  assert not os.path.exists(os.path.join(workdir, run_dir.EVAL_RECORD_FILE))
  assert _metrics(workdir) == before
  rerun = tiny_run.run(tiny_run.command(workdir, '--stages=eval'), timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  evals = [r for r in _metrics(workdir) if r['stage'] == 'eval']
  assert evals == [r for r in _metrics(finished) if r['stage'] == 'eval']
