"""Heuristic parser: images -> step sequences (docs/model.md, section 3).

For every grid location l the image patch x_l (zero-padded at the border) has
a nearest part k_l and an energy e_l (its mean intensity).

- raster (reference, T = L): step t is location t; drawn when e_t > threshold.
- greedy (matching pursuit): each step pastes the (location, part) pair that
  lowers ||x - c||^2 most; drawing stops for good once the best gain is not
  above the threshold.

Both are pure functions of one image, vmapped over a batch and jitted.
"""

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from npdraw_jax import errors
from npdraw_jax.model import canvas as canvas_lib

ORDERS = ('raster', 'greedy')


class Parse(NamedTuple):
  """A step sequence with its rendering error; leading axes are batch axes.

  Attributes:
    pres: [..., T] bool.
    where: [..., T] int32 location (0 where not drawn, for greedy).
    what: [..., T] int32 part (0 where not drawn, for greedy).
    error: [...] float32 squared error of the rendered parse to the image.
  """

  pres: jax.Array
  where: jax.Array
  what: jax.Array
  error: jax.Array


def location_patches(grid: canvas_lib.Grid, image: jax.Array) -> jax.Array:
  """The image patch at every grid location, zero-padded at the border.

  Args:
    grid: the canvas geometry.
    image: [Hc, Wc, C].

  Returns:
    [L, p, p, C].
  """
  p = grid.patch_size
  chex.assert_shape(image, (grid.canvas_size, grid.canvas_size, None))
  pad = max(0, (grid.side - 1) * grid.stride + p - grid.canvas_size)
  padded = jnp.pad(image, ((0, pad), (0, pad), (0, 0)))
  corners = jnp.asarray(grid.corners())
  return jax.vmap(
    lambda rc: jax.lax.dynamic_slice(padded, (rc[0], rc[1], 0), (p, p, image.shape[-1]))
  )(corners)


def nearest_parts(patches: jax.Array, bank: jax.Array) -> jax.Array:
  """Index of the part closest in squared distance to each patch.

  Args:
    patches: [L, p, p, C].
    bank: [K, p, p, C].

  Returns:
    [L] int32.
  """
  chex.assert_equal_shape_suffix([patches, bank], 3)
  x = patches.reshape(patches.shape[0], -1)
  b = bank.reshape(bank.shape[0], -1)
  # ||x||^2 is the same for every part, so it drops out of the argmin.
  scores = jnp.sum(b**2, axis=1) - 2 * x @ b.T
  return jnp.argmin(scores, axis=1).astype(jnp.int32)


def _squared_error(grid, bank, image, pres, where, what):
  rendered = canvas_lib.render(grid, bank, pres, where, what)
  return jnp.sum((image - rendered) ** 2)


def parse_raster(
  grid: canvas_lib.Grid, bank: jax.Array, image: jax.Array, threshold: float
) -> Parse:
  """Raster parse of one image [Hc, Wc, C]: T = L steps in raster order."""
  patches = location_patches(grid, image)
  pres = jnp.mean(patches, axis=(1, 2, 3)) > threshold
  where = jnp.arange(grid.num_locations, dtype=jnp.int32)
  what = nearest_parts(patches, bank)
  return Parse(pres, where, what, _squared_error(grid, bank, image, pres, where, what))


def parse_greedy(
  grid: canvas_lib.Grid,
  bank: jax.Array,
  image: jax.Array,
  num_steps: int,
  threshold: float,
) -> Parse:
  """Greedy (matching pursuit) parse of one image [Hc, Wc, C] in num_steps steps."""
  num_parts = bank.shape[0]
  target = location_patches(grid, image)  # [L, p, p, C]
  # 1 inside the canvas: clipped pixels of a pasted part cost nothing.
  inside = location_patches(grid, jnp.ones(image.shape[:2] + (1,), image.dtype))

  def step(carry, _):
    canvas, stopped = carry
    current = location_patches(grid, canvas)
    before = jnp.sum(inside * (target - current) ** 2, axis=(1, 2, 3))
    pasted = jnp.maximum(current[:, None], bank[None])  # [L, K, p, p, C]
    after = jnp.sum(inside[:, None] * (target[:, None] - pasted) ** 2, axis=(2, 3, 4))
    gain = (before[:, None] - after).reshape(-1)
    best = jnp.argmax(gain)
    where, what = best // num_parts, best % num_parts
    draw = ~stopped & (gain[best] > threshold)
    part = canvas_lib.paste(grid, bank[what], where)
    canvas = jnp.where(draw, jnp.maximum(canvas, part), canvas)
    zero = jnp.zeros((), jnp.int32)
    out = (draw, jnp.where(draw, where, zero), jnp.where(draw, what, zero))
    return (canvas, stopped | ~draw), out

  init = (jnp.zeros_like(image), jnp.zeros((), bool))
  (canvas, _), (pres, where, what) = jax.lax.scan(step, init, None, length=num_steps)
  return Parse(
    pres,
    where.astype(jnp.int32),
    what.astype(jnp.int32),
    jnp.sum((image - canvas) ** 2),
  )


@functools.partial(jax.jit, static_argnames=('grid', 'order', 'num_steps'))
def parse_batch(
  grid: canvas_lib.Grid,
  bank: jax.Array,
  images: jax.Array,
  order: str,
  num_steps: int,
  threshold: float,
) -> Parse:
  """Parses a batch [N, Hc, Wc, C]; every field gains a leading N axis."""
  chex.assert_rank(images, 4)
  if order == 'raster':
    if num_steps != grid.num_locations:
      raise ValueError(
        f'The raster parse has T = L = {grid.num_locations} steps, got T = {num_steps}.'
      )
    return jax.vmap(lambda x: parse_raster(grid, bank, x, threshold))(images)
  if order == 'greedy':
    return jax.vmap(lambda x: parse_greedy(grid, bank, x, num_steps, threshold))(images)
  raise errors.ConfigError(f'parse.order must be one of {ORDERS}, got {order!r}.')


def parse_images(
  grid: canvas_lib.Grid,
  bank: np.ndarray,
  images: np.ndarray,
  order: str,
  num_steps: int,
  threshold: float,
  batch_size: int,
  description: str = 'parse',
) -> Parse:
  """Parses a whole split in fixed-size batches with a progress bar.

  Args:
    grid: the canvas geometry.
    bank: [K, p, p, C] parts.
    images: [N, Hc, Wc, C] float in [0, 1].
    order: 'raster' or 'greedy'.
    num_steps: T.
    threshold: see the module docstring.
    batch_size: images per compiled call; the last batch is padded.
    description: label of the progress bar.

  Returns:
    A Parse of NumPy arrays with a leading N axis.
  """
  chex.assert_shape(images, (None, grid.canvas_size, grid.canvas_size, bank.shape[-1]))
  num_images = images.shape[0]
  if num_images == 0:
    raise ValueError('No images to parse.')
  batch_size = min(batch_size, num_images)
  bank = jnp.asarray(bank)
  pieces = []
  for start in tqdm(range(0, num_images, batch_size), desc=description, unit='batch'):
    batch = images[start : start + batch_size]
    filled = len(batch)
    # Pad to a fixed shape so the last batch does not compile again.
    batch = np.pad(batch, ((0, batch_size - filled), (0, 0), (0, 0), (0, 0)))
    parse = parse_batch(grid, bank, jnp.asarray(batch), order, num_steps, threshold)
    pieces.append(jax.tree.map(lambda a, n=filled: np.asarray(a)[:n], parse))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
