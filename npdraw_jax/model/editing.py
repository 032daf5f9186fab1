"""Latent editing (docs/model.md, section 9): B's parts inside a region, A's outside.

Images A and B are encoded to their most likely drawing steps (api.Run.edit
does the whole edit); the edited drawing keeps A's drawn steps whose part
boxes lie outside the region and B's drawn steps whose boxes lie inside it,
and is rendered and decoded as usual.
A box lies inside when its centre does (boxes are clipped to the canvas).
"""

import re
from typing import NamedTuple

import numpy as np

from npdraw_jax.model import canvas as canvas_lib

NAMED_REGIONS = ('top', 'bottom', 'left', 'right')


class Steps(NamedTuple):
  """A drawing: pres [..., T] bool, where [..., T] and what [..., T] int32."""

  pres: np.ndarray
  where: np.ndarray
  what: np.ndarray


def parse_region(text: str, image_size: int) -> tuple[float, float, float, float]:
  """'top', 'bottom', 'left', 'right' (halves) or 'x0,y0,x1,y1' in image pixels.

  Returns (x0, y0, x1, y1) with 0 <= x0 <= x1 <= size and the same for y; the
  region is [x0, x1) x [y0, y1), so x0 == x1 makes it empty.
  """
  size, half = image_size, image_size / 2
  named = {
    'top': (0, 0, size, half),
    'bottom': (0, half, size, size),
    'left': (0, 0, half, size),
    'right': (half, 0, size, size),
  }
  if text in named:
    return named[text]
  if not re.fullmatch(r'\s*-?\d+(\.\d*)?(\s*,\s*-?\d+(\.\d*)?){3}\s*', text):
    raise ValueError(
      f'A region is one of {", ".join(NAMED_REGIONS)} or x0,y0,x1,y1 in pixels, not {text!r}.'
    )
  x0, y0, x1, y1 = (float(v) for v in text.split(','))
  if not (0 <= x0 <= x1 <= size and 0 <= y0 <= y1 <= size):
    raise ValueError(
      f'Region {text!r} must satisfy 0 <= x0 <= x1 <= {size} and 0 <= y0 <= y1 <= {size}.'
    )
  return x0, y0, x1, y1


def locations_in_region(
  grid: canvas_lib.Grid, region: tuple[float, float, float, float], image_size: int
) -> np.ndarray:
  """[L] bool: whether the centre of each location's clipped box lies in the region.

  The region is in image pixels; the canvas may be smaller than the image.
  """
  corners = grid.corners().astype(np.float64)  # [L, (row, col)]
  ends = np.minimum(corners + grid.patch_size, grid.canvas_size)
  centres = (corners + ends) / 2 * (image_size / grid.canvas_size)
  x0, y0, x1, y1 = region
  rows, cols = centres[:, 0], centres[:, 1]
  return (x0 <= cols) & (cols < x1) & (y0 <= rows) & (rows < y1)


def compose(a: Steps, b: Steps, in_region: np.ndarray) -> Steps:
  """A's drawn steps outside the region, then B's inside, [..., 2T].

  Undrawn steps keep their place (pres False), so the result renders with the
  same functions as any drawing; the canvas is a max, so order is irrelevant.
  """
  keep_a = a.pres & ~in_region[a.where]
  keep_b = b.pres & in_region[b.where]
  join = lambda x, y: np.concatenate([x, y], axis=-1)
  return Steps(join(keep_a, keep_b), join(a.where, b.where), join(a.what, b.what))
