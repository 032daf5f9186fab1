"""experiments.edit's inputs: the picture's directory, a run directory nobody can
write and a run whose data is gone are each one clear line; and the helpers
that make a run read-only for a command (explore_test.py uses them too).

As root, mode bits stop no write, so a command meant to be unable to write
runs without CAP_DAC_OVERRIDE (setpriv): root then obeys the bits of the
files it owns, as any user does.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import tiny_run
from absl import app
from absl.testing import absltest
from PIL import Image

from experiments import edit
from npdraw_jax import api
from npdraw_jax.infra import checkpointing, input_pipeline, run_dir
from npdraw_jax.model import npdraw

pytestmark = pytest.mark.slow  # Command lines on a trained run.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reader_prefix() -> list[str] | None:
  """The command prefix under which mode bits stop writes ([] for a user other
  than root); None when root cannot drop CAP_DAC_OVERRIDE here (no setpriv)."""
  if os.geteuid() != 0:
    return []
  setpriv = shutil.which('setpriv')
  return None if setpriv is None else [setpriv, '--bounding-set=-dac_override']


def read_only_copy(test_class: type[absltest.TestCase]) -> str:
  """A copy of the shared tiny run with every write bit cleared, removed after
  test_class's tests."""
  root = tempfile.mkdtemp()
  workdir = os.path.join(root, 'run')
  shutil.copytree(tiny_run.trained_run(), workdir)
  subprocess.run(['chmod', '-R', 'a-w', workdir], check=True)

  def remove():
    subprocess.run(['chmod', '-R', 'u+w', workdir], check=True)
    shutil.rmtree(root)

  test_class.addClassCleanup(remove)
  return workdir


def cannot_write(workdir: str, prefix: list[str]) -> bool:
  """Whether a command under prefix fails to create a file in workdir: the
  check that a read-only test tests something."""
  probe = [*prefix, 'touch', os.path.join(workdir, 'probe')]
  return subprocess.run(probe, capture_output=True).returncode != 0


def snapshot(directory: str) -> dict[str, tuple[int, int] | None]:
  """{relative path: (size, mtime_ns) of a file, None for a directory} under directory."""
  found = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), directory)] = None
    for name in files:
      stat = os.stat(os.path.join(root, name))
      found[os.path.relpath(os.path.join(root, name), directory)] = (stat.st_size, stat.st_mtime_ns)
  return found


def run_edit(workdir: str, *flags: str, prefix: list[str] = ()) -> subprocess.CompletedProcess:
  command = [sys.executable, '-m', 'experiments.edit', f'--workdir={workdir}', '--a=0', '--b=1']
  return subprocess.run(
    [*prefix, *command, '--region=top', *flags],
    cwd=REPO,
    env={**os.environ, **tiny_run.ENV},
    capture_output=True,
    text=True,
    timeout=300,
  )


class EditCommandTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tiny_run.trained_run()
    cls.read_only = read_only_copy(cls)

  def assert_one_line_error(self, result: subprocess.CompletedProcess, line: str):
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(result.stderr.strip().splitlines()[-1], f'Error: {line}')

  def test_picture_in_a_missing_directory_is_refused_and_none_made(self):
    missing = os.path.join(tempfile.mkdtemp(), 'absent')
    out = os.path.join(missing, 'edit.png')
    result = run_edit(self.workdir, f'--out={out}')
    self.assert_one_line_error(result, f'--out={out}: the directory {missing} does not exist.')
    self.assertFalse(os.path.exists(missing))

  def test_read_only_run_edits_into_out_elsewhere_and_is_named_without_out(self):
    prefix = reader_prefix()
    if prefix is None or not cannot_write(self.read_only, prefix):
      self.skipTest('Cannot make a directory unwritable here (root without setpriv).')
    before = snapshot(self.read_only)
    default = os.path.join(self.read_only, 'edit_0_1_top.png')
    self.assert_one_line_error(
      run_edit(self.read_only, prefix=prefix),
      f'Cannot write {default}: {self.read_only} is not writable (the run directory); '
      'pass --out=FILE elsewhere.',
    )
    out = os.path.join(tempfile.mkdtemp(), 'edit.png')
    result = run_edit(self.read_only, f'--out={out}', prefix=prefix)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with Image.open(out) as picture:
      # Six panels of 16 pixels, a pixel apart, four times enlarged (pictures.save_grid).
      self.assertEqual(picture.size, ((6 * 17 + 1) * 4, (17 + 1) * 4))
    self.assertEqual(snapshot(self.read_only), before)

  def test_missing_data_is_named_rather_than_the_images(self):
    config = checkpointing.read_config(os.path.join(self.workdir, run_dir.VAE_DIR))
    parts = run_dir.load_bank(self.workdir).parts
    # The networks are not used: test_pair reads the data only.
    present = api.Run(config, npdraw.make_model(config), {}, parts, self.workdir)
    self.assertEqual(edit.test_pair(present, 0, 1).shape, (2, 16, 16, 1))
    count = present.num_test_images
    with self.assertRaisesRegex(app.UsageError, f'--b={count} is not a test image: choose 0 to'):
      edit.test_pair(present, 0, count)
    moved = os.path.join(tempfile.mkdtemp(), 'moved')
    config.data.source = f'folder:{moved}'
    gone = api.Run(config, npdraw.make_model(config), {}, parts, self.workdir)
    with self.assertRaises(input_pipeline.DataError) as raised:
      edit.test_pair(gone, 0, 1)
    self.assertIn(
      f"test images cannot be read: data.source folder '{moved}'", str(raised.exception)
    )
    self.assertNotIn('--a', str(raised.exception))


if __name__ == '__main__':
  absltest.main()
