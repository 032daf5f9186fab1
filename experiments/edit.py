"""Latent editing of two test images (docs/model.md, section 9).

  python -m experiments.edit --workdir=DIR --a=I --b=J \\
      --region=top|bottom|left|right|x0,y0,x1,y1 [--out=FILE]

DIR is a finished run (its vae stage done); its configuration is read from
DIR/vae/config.json. Test images I and J are encoded to their most likely
drawings; the edit keeps J's parts whose boxes fall in the region (image
pixels) and I's elsewhere, renders and decodes it. The picture, by default
DIR/edit_I_J_REGION.png, shows A | B | canvas A | canvas B | edited canvas |
decoded edit.
"""

import os

import numpy as np
from absl import app, flags, logging

from experiments import launch
from npdraw_jax import api
from npdraw_jax.infra import checkpointing, input_pipeline, pictures, run_dir
from npdraw_jax.model import editing

flags.DEFINE_string('workdir', None, 'A finished run directory.')
flags.DEFINE_integer('a', None, 'Test image whose drawing is kept outside the region.')
flags.DEFINE_integer('b', None, 'Test image whose drawing is taken inside the region.')
flags.DEFINE_string('region', None, 'top, bottom, left, right or x0,y0,x1,y1 in image pixels.')
flags.DEFINE_string('out', None, 'Picture to write; default DIR/edit_A_B_REGION.png.')
for _name in ('workdir', 'a', 'b', 'region'):
  flags.mark_flag_as_required(_name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  FLAGS = flags.FLAGS
  # The region is checked before the model loads.
  size = checkpointing.read_config(os.path.join(FLAGS.workdir, run_dir.VAE_DIR)).data.image_size
  try:
    region = editing.parse_region(FLAGS.region, size)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  run = api.load_run(FLAGS.workdir)
  try:
    images = run.test_images([FLAGS.a, FLAGS.b])
  except input_pipeline.DataError as e:
    raise app.UsageError(f'--a and --b must be test images: {e}') from e
  result = run.edit(images[0], images[1], region)
  enlarge = lambda c: c.repeat(size // c.shape[0], axis=0).repeat(size // c.shape[1], axis=1)
  canvases = (result.canvas_a, result.canvas_b, result.canvas)
  panels = [images[0], images[1], *map(enlarge, canvases), result.decoded]
  tag = FLAGS.region.replace(',', '-').replace(' ', '')
  out = FLAGS.out or os.path.join(run.workdir, f'edit_{FLAGS.a}_{FLAGS.b}_{tag}.png')
  pictures.save_grid(out, np.stack(panels).astype(np.float32), columns=len(panels), scale=4)
  logging.info(
    'Kept %d parts of A, took %d of B (%d of %d locations in the region); wrote %s.',
    result.parts_from_a,
    result.parts_from_b,
    int(editing.locations_in_region(run.grid, region, size).sum()),
    run.grid.num_locations,
    out,
  )


if __name__ == '__main__':
  launch.run_app(main)
