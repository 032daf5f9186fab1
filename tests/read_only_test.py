"""The eval stage on a run directory nobody can write: it reports the recorded
eval, or computes and logs one without recording it; a stage that must write
there ends with one line.

As root, mode bits do not stop writes, so the run directory is mounted
read-only in a private mount namespace (unshare); as another user it is made
unwritable with chmod.
"""

import os
import shutil
import subprocess

import pytest
import tiny_run

from npdraw_jax.infra import run_dir

pytestmark = pytest.mark.slow  # Command lines.


def _snapshot(workdir: str) -> dict[str, tuple[int, int]]:
  """relative path -> (size, mtime_ns) of every file under workdir."""
  found = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      stat = os.stat(os.path.join(root, name))
      found[os.path.relpath(os.path.join(root, name), workdir)] = (stat.st_size, stat.st_mtime_ns)
  return found


# Run as `sh -c MOUNT_THEN_EXEC WORKDIR COMMAND...` in a private mount namespace.
MOUNT_THEN_EXEC = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def _run_read_only(workdir: str, *command: str) -> subprocess.CompletedProcess:
  """`command` run while workdir cannot be written."""
  if os.geteuid() != 0:
    subprocess.run(['chmod', '-R', 'a-w', workdir], check=True)
    try:
      return tiny_run.run(list(command), timeout=300)
    finally:
      subprocess.run(['chmod', '-R', 'u+w', workdir], check=True)
  if shutil.which('unshare') is None:
    pytest.fail('Running as root needs unshare (util-linux) to make a read-only mount.')
  return tiny_run.run(['unshare', '-m', 'sh', '-c', MOUNT_THEN_EXEC, workdir, *command], 300)


def test_the_mount_is_read_only():
  workdir = tiny_run.copy()
  result = _run_read_only(workdir, 'touch', os.path.join(workdir, 'probe'))
  assert result.returncode != 0
  assert not os.path.exists(os.path.join(workdir, 'probe'))


@pytest.mark.parametrize(
  ('recorded', 'says'),
  [
    (True, 'already evaluated under these settings'),
    (False, 'is not writable: the summary is logged only, not recorded'),
  ],
)
def test_eval_reads_only(recorded, says):
  workdir = tiny_run.copy()
  if not recorded:
    os.remove(os.path.join(workdir, run_dir.EVAL_RECORD_FILE))
  before = _snapshot(workdir)
  result = _run_read_only(workdir, *tiny_run.command(workdir, '--stages=eval'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert says in result.stderr
  assert _snapshot(workdir) == before


def test_a_stage_that_writes_ends_with_one_line():
  workdir = tiny_run.copy()
  shutil.rmtree(os.path.join(workdir, run_dir.VAE_DIR))
  before = _snapshot(workdir)
  result = _run_read_only(workdir, *tiny_run.command(workdir, '--stages=vae'))
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('Error: Cannot write '), last
  assert _snapshot(workdir) == before
