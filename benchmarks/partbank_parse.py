"""Part bank plus raster parse of MNIST-sized images (60,000 in the full run).

The 5,000 embedded digits are tiled to the requested count; the first parse
(with compilation) is reported apart from a second, compiled one.
"""

import time

import numpy as np

from configs import mnist
from npdraw_jax.infra import input_pipeline
from npdraw_jax.model import canvas, parsing
from npdraw_jax.stages import bank_parse


def measure(num_images: int) -> list[str]:
  """Runs bank + raster parse on the MNIST configuration; markdown rows out."""
  config = mnist.get_config()
  config.data.source = 'embedded'
  digits = input_pipeline.load_split(config.data, 'train').canvas_images
  reps = -(-num_images // len(digits))
  images = np.tile(digits, (reps, 1, 1, 1))[:num_images].astype(np.float32) / 255.0
  grid = canvas.grid_from_config(config)

  start = time.perf_counter()
  bank = bank_parse.build_bank(config, images)
  bank_seconds = time.perf_counter() - start

  def parse():
    return parsing.parse_images(
      grid,
      bank.parts,
      images,
      'raster',
      config.model.T,
      config.parse.threshold,
      config.parse.batch_size,
    )

  start = time.perf_counter()
  parse()  # Includes the one compilation.
  first_parse = time.perf_counter() - start
  start = time.perf_counter()
  parse()
  warm_parse = time.perf_counter() - start
  total = bank_seconds + first_parse
  return [
    f'Part bank + raster parse, {num_images:,} images 28x28, K={config.model.K}, '
    f'p={config.model.patch_size}, {bank.num_patches:,} patches clustered '
    f'({bank.iterations} Lloyd iterations):',
    '',
    '| step | seconds | images/s |',
    '|---|---|---|',
    f'| part bank (sampling + k-means++ + Lloyd, with compile) | {bank_seconds:.1f} | '
    f'{num_images / bank_seconds:,.0f} |',
    f'| raster parse, first run (with compile) | {first_parse:.1f} | '
    f'{num_images / first_parse:,.0f} |',
    f'| raster parse, compiled | {warm_parse:.1f} | {num_images / warm_parse:,.0f} |',
    f'| **bank + first parse** | **{total:.1f}** | {num_images / total:,.0f} |',
  ]
