"""Latent editing of two test images (docs/model.md, section 9).

  python -m experiments.edit --workdir=DIR --a=I --b=J \\
      --region=top|bottom|left|right|x0,y0,x1,y1 [--out=FILE]

DIR is a finished run (its vae stage done); its configuration is read from
DIR/vae/config.json. Test images I and J are encoded to their most likely
drawings; the edit keeps J's parts whose boxes fall in the region (image
pixels) and I's elsewhere, renders and decodes it. The picture, by default
DIR/edit_I_J_REGION.png, shows A | B | canvas A | canvas B | edited canvas |
decoded edit. Only the picture is written: with --out elsewhere, DIR may be
read-only. A bad region, a missing or unwritable directory for the picture
and missing data are each one error line.
"""

import os

import numpy as np
from absl import app, flags, logging

from experiments import launch
from npdraw_jax import api, errors
from npdraw_jax.infra import checkpointing, pictures, run_dir
from npdraw_jax.model import editing


def define_flags():
  # Defined when run as a command only: importing the helpers defines no flags.
  flags.DEFINE_string('workdir', None, 'A finished run directory.')
  flags.DEFINE_integer(
    'a', None, 'Test image whose drawing is kept outside the region.', lower_bound=0
  )
  flags.DEFINE_integer(
    'b', None, 'Test image whose drawing is taken inside the region.', lower_bound=0
  )
  flags.DEFINE_string('region', None, 'top, bottom, left, right or x0,y0,x1,y1 in image pixels.')
  flags.DEFINE_string('out', None, 'Picture to write; default DIR/edit_A_B_REGION.png.')
  for name in ('workdir', 'a', 'b', 'region'):
    flags.mark_flag_as_required(name)


def output_path(out: str | None, default: str) -> str:
  """The picture's path, --out or else default, checked before any work: its
  directory must exist (none is made) and be writable."""
  path = os.path.abspath(out or default)
  directory = os.path.dirname(path)
  if not os.path.isdir(directory):
    raise app.UsageError(f'--out={out}: the directory {directory} does not exist.')
  if os.path.isdir(path):
    raise app.UsageError(f'--out={out} is a directory; name the picture file.')
  if not os.access(directory, os.W_OK):
    hint = '' if out else ' (the run directory); pass --out=FILE elsewhere'
    raise errors.UserError(f'Cannot write {path}: {directory} is not writable{hint}.')
  return path


def test_pair(run: api.Run, a: int, b: int) -> np.ndarray:
  """Test images a and b, [2, H, W, C]. Missing data is its own error (an
  input_pipeline.DataError naming the data), before a and b are checked."""
  count = run.num_test_images
  for flag, index in (('a', a), ('b', b)):
    if not 0 <= index < count:
      raise app.UsageError(f'--{flag}={index} is not a test image: choose 0 to {count - 1}.')
  return run.test_images([a, b])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  FLAGS = flags.FLAGS
  workdir = os.path.abspath(FLAGS.workdir)
  # The region and the picture's path are checked before the model loads.
  size = checkpointing.read_config(os.path.join(workdir, run_dir.VAE_DIR)).data.image_size
  try:
    region = editing.parse_region(FLAGS.region, size)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  tag = FLAGS.region.replace(',', '-').replace(' ', '')
  out = output_path(FLAGS.out, os.path.join(workdir, f'edit_{FLAGS.a}_{FLAGS.b}_{tag}.png'))
  run = api.load_run(workdir)
  images = test_pair(run, FLAGS.a, FLAGS.b)
  result = run.edit(images[0], images[1], region)
  enlarge = lambda c: c.repeat(size // c.shape[0], axis=0).repeat(size // c.shape[1], axis=1)
  canvases = (result.canvas_a, result.canvas_b, result.canvas)
  panels = [images[0], images[1], *map(enlarge, canvases), result.decoded]
  try:
    pictures.save_grid(out, np.stack(panels).astype(np.float32), columns=len(panels), scale=4)
  except OSError as e:  # The directory was checked; it changed meanwhile, or a disk is full.
    raise errors.UserError(f'Cannot write {out}: {e.strerror or e}.') from e
  logging.info(
    'Kept %d parts of A, took %d of B (%d of %d locations in the region); wrote %s.',
    result.parts_from_a,
    result.parts_from_b,
    int(editing.locations_in_region(run.grid, region, size).sum()),
    run.grid.num_locations,
    out,
  )


if __name__ == '__main__':
  launch.run_app(main, define_flags)
