"""A stage that fills the disk ends with one line and leaves no temporary file.

The run directory is a small tmpfs, filled but for a little room, in a private
mount namespace (unshare; as another user than root, inside a user namespace).
"""

import os
import shutil

import pytest
import tiny_run

from npdraw_jax.infra import run_dir

pytestmark = pytest.mark.slow  # Command lines.

DISK_BYTES = 8 << 20
ROOM_BYTES = 256 << 10  # Room for the records and the lock, not for a checkpoint.
LEFTOVERS = ('*.tmp', '*.tmp.*', '*orbax-checkpoint-tmp*')

# `sh -c FILL_THEN_RUN MOUNTPOINT SOURCE COMMAND...`: mounts a DISK_BYTES tmpfs on
# MOUNTPOINT, copies SOURCE into it, fills it but ROOM_BYTES, runs COMMAND, then
# prints every leftover temporary file on stdout and exits with COMMAND's status.
FILL_THEN_RUN = f"""
mount -t tmpfs -o size={DISK_BYTES} tmpfs "$0" || exit 90
cp -a "$1"/. "$0"/ || exit 91
dd if=/dev/zero of="$0/filler" bs=64k 2>/dev/null
truncate -s -{ROOM_BYTES} "$0/filler" || exit 92
shift
"$@"
status=$?
find "$0" {' -o '.join(f"-name '{pattern}'" for pattern in LEFTOVERS)}
exit $status
"""


def _run_on_full_disk(source: str, *flags: str):
  if shutil.which('unshare') is None:
    pytest.fail('This test needs unshare (util-linux) to mount a small disk.')
  namespace = ['unshare', '-m'] if os.geteuid() == 0 else ['unshare', '-r', '-m']
  mountpoint = os.path.join(os.path.dirname(source), 'disk')
  os.mkdir(mountpoint)
  command = tiny_run.command(mountpoint, *flags)
  result = tiny_run.run([*namespace, 'sh', '-c', FILL_THEN_RUN, mountpoint, source, *command], 300)
  assert result.returncode not in (90, 91, 92), f'No small disk: {result.stderr[-2000:]}'
  return result


@pytest.mark.parametrize(
  ('stage', 'removed'),
  [('parse', run_dir.PARSES_FILE), ('vae', run_dir.VAE_DIR)],
)
def test_a_full_disk_ends_with_one_line(stage, removed):
  source = tiny_run.copy()
  path = os.path.join(source, removed)
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  result = _run_on_full_disk(source, f'--stages={stage}')
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('Error: The disk is full (No space left on device'), result.stderr[-3000:]
  assert result.stdout.strip() == ''  # No temporary file is left.
