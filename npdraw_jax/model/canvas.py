"""The location grid and the canvas renderer (docs/model.md, sections 1 and 5).

A drawing is a sequence of T steps; step t pastes part `what_t` of the bank at
grid location `where_t` when `pres_t` is set, and the canvas keeps the
element-wise maximum of everything pasted so far. Parts that overhang the
canvas border are clipped.

Three ways to put a part on the canvas:
- `paste`: hard integer location, pad-and-slice (`lax.dynamic_update_slice`).
- `place`: a weight per location (one-hot or soft), a linear map built from
  the separable row/column placement matrices; gradients reach the weights.
- `place_straight_through`: `place` for weights that are one-hot in value
  (straight-through samples, parses): `paste` forward, `place`'s gradient.
  Training with vae.where_gradient = 'straight_through' renders with it: in
  the stage-2 train step it is as fast as the `place` einsum (within a few
  percent either way, benchmarks/RESULTS.md, "Variants in the stage-2 train
  step"), it builds no [..., G, Hc, p, C] intermediates, and it stays exact
  where float32 matmuls round (TPUs). The reference setting ('none') pastes
  at the argmax instead, so `where` gets no gradient (render_relaxed_steps).

The prior reads, before each step, the canvas and a location map: the union
of the boxes of earlier steps. Which steps' boxes it holds is the prior's
`history` (PRIOR_HISTORIES): 'every_step', the authors' (their renderer
multiplies the parts by pres but not the boxes, so a step's box enters drawn
or not), or 'drawn' (only drawn steps' boxes). The authors' sampler keeps no
location for a step it leaves undrawn, and their renderer turns that empty
location into a small mark in the corner (`empty_location_mark`), which is
what a sampled undrawn step adds under 'every_step' (`sampled_boxes`).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from npdraw_jax import errors
from npdraw_jax.model import platform_kernels

PRIOR_HISTORIES = ('every_step', 'drawn')


@dataclasses.dataclass(frozen=True)
class Grid:
  """Geometry of the latent canvas: hashable, so it can be a static argument.

  Attributes:
    canvas_size: side Hc = Wc of the square canvas.
    patch_size: side p of a part.
    stride: s, the spacing of the candidate top-left corners.
  """

  canvas_size: int
  patch_size: int
  stride: int

  def __post_init__(self):
    if min(self.canvas_size, self.patch_size, self.stride) < 1:
      raise ValueError(f'Grid sizes must be positive, got {self}.')
    if self.patch_size > self.canvas_size:
      raise ValueError(f'patch_size {self.patch_size} exceeds the canvas {self}.')

  @property
  def side(self) -> int:
    """G = ceil(Hc / s): locations per row and per column."""
    return math.ceil(self.canvas_size / self.stride)

  @property
  def num_locations(self) -> int:
    """L = G * G."""
    return self.side * self.side

  def corners(self) -> np.ndarray:
    """Top-left corner (row, col) of every location in raster order, [L, 2]."""
    starts = np.arange(self.side) * self.stride
    rows, cols = np.meshgrid(starts, starts, indexing='ij')
    return np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.int32)

  def axis_placement(self) -> np.ndarray:
    """R[g, y, i] = 1 where part row i lands on canvas row y at grid row g.

    Rows past the border are dropped (clipping). Shape [G, Hc, p], float32;
    the same matrix serves the columns since the grid is square.
    """
    g = np.arange(self.side)[:, None, None]
    y = np.arange(self.canvas_size)[None, :, None]
    i = np.arange(self.patch_size)[None, None, :]
    return (y == g * self.stride + i).astype(np.float32)


def grid_from_config(config) -> Grid:
  """The canvas geometry a configuration (ml_collections) asks for."""
  return Grid(
    canvas_size=config.data.canvas_size,
    patch_size=config.model.patch_size,
    stride=config.model.location_stride,
  )


def paste(grid: Grid, parts: jax.Array, where: jax.Array) -> jax.Array:
  """Pastes each part at its integer location on an all-zero canvas.

  Args:
    grid: the canvas geometry.
    parts: [..., p, p, C] parts.
    where: [...] int location indices in [0, L).

  Returns:
    [..., Hc, Wc, C] canvases holding one (clipped) part each.
  """
  p, channels = grid.patch_size, parts.shape[-1]
  chex.assert_shape(parts, (*where.shape, p, p, channels))
  # Pad so that a part at the last grid location fits before the crop.
  padded = max(grid.canvas_size, (grid.side - 1) * grid.stride + p)
  corners = jnp.asarray(grid.corners())

  def paste_one(part, loc):
    row, col = corners[loc, 0], corners[loc, 1]
    zeros = jnp.zeros((padded, padded, channels), part.dtype)
    # A typed zero: a Python 0 would be int64 under jax_enable_x64.
    full = jax.lax.dynamic_update_slice(zeros, part, (row, col, jnp.zeros((), row.dtype)))
    return full[: grid.canvas_size, : grid.canvas_size]

  flat = jax.vmap(paste_one)(parts.reshape(-1, p, p, channels), where.reshape(-1).astype(jnp.int32))
  return flat.reshape(*where.shape, grid.canvas_size, grid.canvas_size, channels)


def place(grid: Grid, parts: jax.Array, where_weights: jax.Array) -> jax.Array:
  """Places parts with a weight per location: sum_l w_l * paste(part, l).

  Exact for one-hot weights, linear in both arguments, so gradients reach a
  relaxed (e.g. straight-through) `where`. The placement tensor factorises
  into row and column matrices, so no [L, Hc, Wc, p, p] tensor is built.

  Args:
    grid: the canvas geometry.
    parts: [..., p, p, C] parts.
    where_weights: [..., L] weights over locations.

  Returns:
    [..., Hc, Wc, C].
  """
  side = grid.side
  chex.assert_shape(where_weights, (*parts.shape[:-3], grid.num_locations))
  placement = jnp.asarray(grid.axis_placement())  # [G, H, p]
  weights = where_weights.reshape(*where_weights.shape[:-1], side, side)
  # Rows first, then the location weights, then the columns: the cheapest order.
  rows = jnp.einsum('gyi,...ijc->...gyjc', placement, parts)
  mixed = jnp.einsum('...ab,...ayjc->...byjc', weights, rows)
  out = jnp.einsum('...byjc,bxj->...yxc', mixed, placement)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def place_straight_through(grid: Grid, parts: jax.Array, where_weights: jax.Array) -> jax.Array:
  """`place` for weights that are one-hot in value: pad-and-slice forward, `place`'s gradient.

  For a straight-through sample (one-hot forward, soft gradient) or a parse,
  sum_l w_l * paste(part, l) is the paste at argmax(w), so the forward only
  writes each part once; the backward crops the incoming gradient at every
  location and returns exactly `place`'s vector-Jacobian product. Soft
  weights need `place`: here their forward would be wrong.

  Args:
    grid: the canvas geometry.
    parts: [..., p, p, C] parts.
    where_weights: [..., L], one-hot in value.

  Returns:
    [..., Hc, Wc, C].
  """
  chex.assert_shape(where_weights, (*parts.shape[:-3], grid.num_locations))
  return paste(grid, parts, jnp.argmax(where_weights, axis=-1))


def _place_straight_through_fwd(grid, parts, where_weights):
  return place_straight_through(grid, parts, where_weights), (parts, where_weights)


def _place_straight_through_bwd(grid, residuals, g):
  parts, where_weights = residuals
  crops = crop_all(grid, g)  # [..., L, p, p, C]
  d_parts = jnp.einsum('...l,...lijc->...ijc', where_weights, crops)
  d_weights = jnp.einsum('...lijc,...ijc->...l', crops, parts)
  return d_parts, d_weights


place_straight_through.defvjp(_place_straight_through_fwd, _place_straight_through_bwd)


def crop_all(grid: Grid, canvases: jax.Array) -> jax.Array:
  """The p x p window at every location, zero past the border: [..., H, W, C] -> [..., L, p, p, C].

  The adjoint of paste: <crop_all(g)[l], part> = <g, paste(part, l)>.
  """
  p, size = grid.patch_size, grid.canvas_size
  padded = max(size, (grid.side - 1) * grid.stride + p)
  pad = [(0, 0)] * (canvases.ndim - 3) + [(0, padded - size)] * 2 + [(0, 0)]
  canvases = jnp.pad(canvases, pad)
  corners = grid.corners()
  rows = corners[:, 0, None] + np.arange(p)  # [L, p]
  cols = corners[:, 1, None] + np.arange(p)
  return canvases[..., rows[:, :, None], cols[:, None, :], :]


def boxes(grid: Grid, where: jax.Array, dtype=jnp.float32) -> jax.Array:
  """The (clipped) box of each integer location as a mask, [..., Hc, Wc, 1]."""
  ones = jnp.ones((*where.shape, grid.patch_size, grid.patch_size, 1), dtype)
  return paste(grid, ones, where)


def _drawn(placed: jax.Array, pres: jax.Array) -> jax.Array:
  """Each step's pasted part times its pres, [..., T, H, W, C]."""
  chex.assert_equal_shape_prefix([placed, pres], pres.ndim)
  return placed * pres.astype(placed.dtype)[..., None, None, None]


def accumulate(placed: jax.Array, pres: jax.Array) -> jax.Array:
  """Canvases after every step: c_t = max(c_{t-1}, pres_t * placed_t), c_0 = 0.

  Args:
    placed: [..., T, H, W, C] non-negative pasted parts, one per step.
    pres: [..., T] in [0, 1] (bool or relaxed).

  Returns:
    [..., T, H, W, C] c_1 .. c_T.
  """
  # The running max equals the recursion because parts are >= 0 and c_0 = 0.
  return jax.lax.cummax(_drawn(placed, pres), axis=pres.ndim - 1)


def check_history(history: str) -> str:
  """`history` if it names one of PRIOR_HISTORIES, else a ConfigError naming the config key."""
  if history not in PRIOR_HISTORIES:
    raise errors.ConfigError(
      f'model.prior_history must be one of {PRIOR_HISTORIES}, not {history!r}.'
    )
  return history


def _boxes_pres(pres: jax.Array, history: str) -> jax.Array:
  """The pres the location map accumulates with: every step's box (1) or the drawn ones'."""
  return jnp.ones_like(pres) if check_history(history) == 'every_step' else pres


def render_steps(
  grid: Grid,
  bank: jax.Array,
  pres: jax.Array,
  where: jax.Array,
  what: jax.Array,
  history: str = 'drawn',
) -> tuple[jax.Array, jax.Array]:
  """Hard rendering: canvas and location map after every step.

  Args:
    grid: the canvas geometry.
    bank: [K, p, p, C] parts.
    pres: [..., T] bool.
    where: [..., T] int locations.
    what: [..., T] int part indices.
    history: which steps' boxes the location maps hold (PRIOR_HISTORIES).

  Returns:
    canvases [..., T, Hc, Wc, C] and location maps [..., T, Hc, Wc, 1].
  """
  chex.assert_equal_shape([pres, where, what])
  parts = jnp.take(bank, what, axis=0)
  canvases = accumulate(paste(grid, parts, where), pres)
  return canvases, accumulate(boxes(grid, where, bank.dtype), _boxes_pres(pres, history))


def empty_location_mark(grid: Grid) -> np.ndarray:
  """The location map the authors' renderer draws for an all-zero location one-hot, [Hc, Wc, 1].

  Their renderer puts row i of a part centred at c on canvas row
  round(c + i + 1 - p / 2) - 1 (rounding half to even) and adds the rows that
  land on one canvas row; an all-zero one-hot gives c = 0 on both axes. For
  p = 5 that is 4 at pixel (1, 1); for p = 4, ones on the 2 x 2 corner.
  """
  rows = np.round(np.arange(grid.patch_size) + 1 - grid.patch_size / 2).astype(int) - 1
  counts = np.bincount(rows[rows >= 0], minlength=grid.canvas_size)[: grid.canvas_size]
  return np.outer(counts, counts).astype(np.float32)[..., None]


def sampled_boxes(grid: Grid, pres: jax.Array, where: jax.Array, history: str, dtype) -> jax.Array:
  """What each sampled step adds to the location map, [..., Hc, Wc, 1].

  A drawn step adds its box; an undrawn one adds nothing ('drawn') or, as in
  the authors' sampler, the empty location's mark ('every_step').
  """
  box = boxes(grid, where, dtype)
  undrawn = jnp.asarray(empty_location_mark(grid), dtype)
  if check_history(history) == 'drawn':
    undrawn = jnp.zeros_like(undrawn)
  return jnp.where(pres[..., None, None, None], box, undrawn)


def render_sampled_steps(
  grid: Grid,
  bank: jax.Array,
  pres: jax.Array,
  where: jax.Array,
  what: jax.Array,
  history: str,
) -> tuple[jax.Array, jax.Array]:
  """render_steps as the model generates: the location maps hold what sampled_boxes
  adds, so an undrawn step's `where` (which the prior does not draw) is not read.

  The sampler builds these step by step; the bound scores q's samples on them.
  """
  canvases, _ = render_steps(grid, bank, pres, where, what)
  added = sampled_boxes(grid, pres, where, history, bank.dtype)
  return canvases, jax.lax.cummax(added, axis=pres.ndim - 1)


def render(
  grid: Grid, bank: jax.Array, pres: jax.Array, where: jax.Array, what: jax.Array
) -> jax.Array:
  """Hard rendering of the final canvas c_T, [..., Hc, Wc, C] (see render_steps)."""
  chex.assert_equal_shape([pres, where, what])
  parts = jnp.take(bank, what, axis=0)
  drawn = paste(grid, parts, where) * pres[..., None, None, None].astype(bank.dtype)
  return jnp.max(drawn, axis=pres.ndim - 1)


def _relaxed_parts(
  grid: Grid,
  bank: jax.Array,
  pres: jax.Array,
  where_weights: jax.Array,
  what_weights: jax.Array,
  where_gradient: bool,
) -> tuple[Callable, jax.Array]:
  """What both relaxed renderers start from: how to paste, and the soft parts [..., T, p, p, C]."""
  chex.assert_shape(where_weights, (*pres.shape, grid.num_locations))
  chex.assert_shape(what_weights, (*pres.shape, bank.shape[0]))
  parts = jnp.einsum('...k,kijc->...ijc', what_weights, bank)
  if where_gradient:
    return lambda x: place_straight_through(grid, x, where_weights), parts
  where = jnp.argmax(where_weights, axis=-1)
  return lambda x: paste(grid, x, where), parts


def render_relaxed_steps(
  grid: Grid,
  bank: jax.Array,
  pres: jax.Array,
  where_weights: jax.Array,
  what_weights: jax.Array,
  where_gradient: bool = True,
  history: str = 'drawn',
) -> tuple[jax.Array, jax.Array]:
  """Relaxed rendering: soft `what`, straight-through `where`, `pres` in [0, 1].

  The part of step t is sum_k what_weights[t, k] * bank[k]; gradients flow to
  `what` and `pres`, and to `where` as through `place` unless where_gradient
  is False.

  Args:
    grid: the canvas geometry.
    bank: [K, p, p, C] parts.
    pres: [..., T] in [0, 1].
    where_weights: [..., T, L], one-hot in value (see place_straight_through).
    what_weights: [..., T, K].
    where_gradient: False: the parts are pasted at argmax(where_weights) and
      `where` gets exactly zero gradient, as from the authors' renderer (a
      filterbank at rounded centres); cheaper than `place`'s backward.
    history: which steps' boxes the location maps hold (PRIOR_HISTORIES).

  Returns:
    canvases [..., T, Hc, Wc, C] and location maps [..., T, Hc, Wc, 1].
  """
  put, parts = _relaxed_parts(grid, bank, pres, where_weights, what_weights, where_gradient)
  ones = jnp.ones((*pres.shape, grid.patch_size, grid.patch_size, 1), bank.dtype)
  return accumulate(put(parts), pres), accumulate(put(ones), _boxes_pres(pres, history))


def render_relaxed(
  grid: Grid,
  bank: jax.Array,
  pres: jax.Array,
  where_weights: jax.Array,
  what_weights: jax.Array,
  where_gradient: bool = True,
  kernels: str = 'cpu',
) -> jax.Array:
  """The final canvas of render_relaxed_steps, [..., Hc, Wc, C], with the same values and
  gradients, for when nothing reads the history (stage 2 with beta = 0).

  kernels: the form of the running maximum's last element
  (platform_kernels.last_of_cummax); bit-equal in either.
  """
  put, parts = _relaxed_parts(grid, bank, pres, where_weights, what_weights, where_gradient)
  return platform_kernels.last_of_cummax(_drawn(put(parts), pres), pres.ndim - 1, kernels)


def states_before(canvases: jax.Array, maps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The state each step starts from: (c_0 .. c_{T-1}, m_0 .. m_{T-1}).

  Args:
    canvases: [..., T, H, W, C] canvases after each step (c_1 .. c_T).
    maps: [..., T, H, W, 1] location maps after each step.

  Returns:
    The same shapes, shifted one step later, with empty c_0 and m_0.
  """
  chex.assert_equal_shape_prefix([canvases, maps], canvases.ndim - 1)

  def shift(x):
    axis = x.ndim - 4
    empty = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
    return jnp.concatenate([empty, jax.lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)], axis)

  return shift(canvases), shift(maps)
