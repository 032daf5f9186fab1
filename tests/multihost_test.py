"""Real multi-process runs: two OS processes on this machine joined through
jax.distributed (CPU backend, coordinator on localhost), against one process
with the same two devices, global batch and data order.

The two-process run is also killed once: process 1 dies (kill -9) during the
VAE stage, process 0 must stop with a one-line error, and rerunning both must
resume and finish. Exact resumption makes the finished two-process run equal
to the uninterrupted one-process run, which every comparison below checks.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import checkpoint_files
import numpy as np
import pytest
from flax import traverse_util

pytestmark = pytest.mark.slow  # Minutes: started first (tests/conftest.py).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short stages: the point is agreement, not quality.
OVERRIDES = (
  '--config=configs/tiny.py',
  '--config.prior.train_steps=10',
  '--config.prior.eval_every=5',
  '--config.prior.checkpoint_every=5',
  '--config.vae.train_steps=20',
  '--config.vae.checkpoint_every=10',
)
RUN_TIMEOUT_S = 400
LOST_PEER_BOUND_S = 120  # The survivor stops within this after its peer dies.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices_per_process: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}',
    PYTHONUNBUFFERED='1',
  )
  return env


def _start(workdir: str, num_processes: int, devices_per_process: int, log_dir: str, tag: str):
  """The processes of one run of the pipeline; their stderr goes to files."""
  distributed = []
  port = _free_port()
  processes = []
  for process_id in range(num_processes):
    if num_processes > 1:
      distributed = [
        f'--coordinator_address=127.0.0.1:{port}',
        f'--num_processes={num_processes}',
        f'--process_id={process_id}',
      ]
    log = open(os.path.join(log_dir, f'{tag}_{process_id}.log'), 'w')  # noqa: SIM115
    processes.append(
      subprocess.Popen(
        [
          sys.executable,
          '-m',
          'experiments.mnist',
          f'--workdir={workdir}',
          *OVERRIDES,
          *distributed,
        ],
        cwd=REPO,
        env=_env(devices_per_process),
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    )
  return processes


def _log(log_dir: str, tag: str, process_id: int) -> str:
  with open(os.path.join(log_dir, f'{tag}_{process_id}.log')) as f:
    return f.read()


def _wait_all(processes, timeout=RUN_TIMEOUT_S) -> list[int]:
  deadline = time.monotonic() + timeout
  return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _vae_train_steps_logged(workdir: str) -> int:
  try:
    records = _metrics(workdir)
  except (FileNotFoundError, json.JSONDecodeError):
    return 0
  return max([r['step'] for r in records if r['stage'] == 'vae' and r['split'] == 'train'] or [0])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'one': workdir, 'two': workdir, 'lost': (status, seconds, log), ...}."""
  root = tmp_path_factory.mktemp('multihost')
  logs = str(root)
  one, two = str(root / 'one'), str(root / 'two')
  # One run at a time: three processes on a two-core machine would crawl.
  single = _start(one, 1, 2, logs, 'one')
  assert _wait_all(single) == [0], _log(logs, 'one', 0)
  pair = _start(two, 2, 1, logs, 'two')
  # Kill process 1 once the VAE stage has logged a training step.
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while _vae_train_steps_logged(two) < 5:
    assert pair[0].poll() is None and time.monotonic() < deadline, _log(logs, 'two', 0)
    time.sleep(0.2)
  pair[1].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  status = pair[0].wait(timeout=LOST_PEER_BOUND_S + 60)
  lost = status, time.monotonic() - killed_at, _log(logs, 'two', 0)
  rerun = _start(two, 2, 1, logs, 'rerun')
  assert _wait_all(rerun) == [0, 0], _log(logs, 'rerun', 0) + _log(logs, 'rerun', 1)
  return {'one': one, 'two': two, 'lost': lost, 'logs': logs}


def test_survivor_of_a_lost_process_stops_with_one_line(runs):
  status, seconds, log = runs['lost']
  assert status != 0
  assert seconds < LOST_PEER_BOUND_S
  # The error line may follow an unfinished progress bar's carriage returns.
  errors = re.findall(r'Error: .*', log)
  assert len(errors) == 1, log[-3000:]
  assert 'another process' in errors[0] and 'rerun the same command' in errors[0].lower()


def test_first_log_line_names_the_process(runs):
  log = _log(runs['logs'], 'rerun', 1)
  # The project's first line (JAX's own 'Connecting to ...' may come before it).
  first = next(line for line in log.splitlines() if re.match(r'[IWEF]\d{4} .* launch\.py:', line))
  assert first.endswith(
    'JAX process 1 of 2 (joined through flags), 1 local / 2 global devices (cpu).'
  ), first


def test_rerun_resumed_from_a_checkpoint(runs):
  log = _log(runs['logs'], 'rerun', 0)
  assert 'Stage bank: ' in log and 'is current; skipping' in log
  assert 'Restoring ' in log  # The VAE stage went on from its last checkpoint.


def test_two_processes_log_what_one_process_logs(runs):
  one, two = _metrics(runs['one']), _metrics(runs['two'])
  keys = [(r['stage'], r['step'], r['split']) for r in two]
  assert len(keys) == len(set(keys)), 'metrics.jsonl holds a line twice'
  assert keys == [(r['stage'], r['step'], r['split']) for r in one]
  for a, b in zip(one, two, strict=True):
    assert a.keys() == b.keys()
    for name in a:
      if isinstance(a[name], float) and name != 'lr':
        np.testing.assert_allclose(b[name], a[name], rtol=2e-4, atol=1e-4, err_msg=str(a))
  final = two[-1]
  assert final['stage'] == 'eval' and final['test_images'] == 500  # The whole test split.


@pytest.mark.parametrize('stage', ['prior', 'vae'])
def test_final_parameters_equal(runs, stage):
  step_one, one = checkpoint_files.newest_state(os.path.join(runs['one'], stage))
  step_two, two = checkpoint_files.newest_state(os.path.join(runs['two'], stage))
  assert step_one == step_two
  flat_one = traverse_util.flatten_dict(one['params'], sep='/')
  flat_two = traverse_util.flatten_dict(two['params'], sep='/')
  assert flat_one.keys() == flat_two.keys()
  for name, value in flat_one.items():
    np.testing.assert_allclose(flat_two[name], value, rtol=1e-3, atol=1e-5, err_msg=name)


def test_artifacts_written_once(runs):
  for workdir in (runs['one'], runs['two']):
    names = sorted(os.listdir(workdir))
    assert not [n for n in names if n.endswith('.tmp')], names
  with np.load(os.path.join(runs['one'], 'parses.npz')) as a:
    with np.load(os.path.join(runs['two'], 'parses.npz')) as b:
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
