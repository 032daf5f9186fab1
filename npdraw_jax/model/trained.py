"""A trained NP-DRAW with NumPy in and out: sample, encode, render, decode and
edit drawings. api.Run adds a run directory's test images.

Images are float32 [N, H, W, C] in [0, 1] at the run's image size; canvases
[N, Hc, Wc, C] at its canvas size. A Drawing holds N drawings of S steps (S is
usually the run's T, but any S >= 1 renders: an edit joins two drawings into
2T steps). The networks are compiled once per padded shape: batches are padded
to a power of two (at most MAX_BATCH per pass) and steps to a multiple of T, so
repeated calls of similar sizes reuse the compiled functions.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import distributions, editing, npdraw, sampling

MAX_BATCH = 64  # Images, drawings or canvases per compiled pass.


@dataclasses.dataclass(frozen=True)
class Drawing:
  """N drawings of S steps: step s of drawing n pastes part what[n, s] at grid
  location where[n, s] when pres[n, s] is set.

  Attributes:
    pres: [N, S] bool.
    where: [N, S] int32 in [0, L), L the run's grid locations.
    what: [N, S] int32 in [0, K), K the run's parts.
  """

  pres: np.ndarray
  where: np.ndarray
  what: np.ndarray

  def __post_init__(self):
    arrays = {
      'pres': np.asarray(self.pres, bool),
      'where': np.asarray(self.where, np.int32),
      'what': np.asarray(self.what, np.int32),
    }
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays['pres'].ndim != 2 or not arrays['pres'].size:
      raise ValueError(f'pres, where and what must share one shape [N, S], N, S > 0: {shapes}.')
    for name, a in arrays.items():
      object.__setattr__(self, name, a)

  def __len__(self) -> int:
    return self.pres.shape[0]

  def __getitem__(self, rows) -> 'Drawing':
    """The drawings at rows (an index keeps the batch axis: drawing[i] is [1, S])."""
    rows = np.atleast_1d(np.arange(len(self))[rows])
    return Drawing(self.pres[rows], self.where[rows], self.what[rows])


@dataclasses.dataclass(frozen=True)
class Encoding:
  """q's most likely drawing of N images and its per-step probabilities.

  Attributes:
    drawing: [N, T] steps: pres where P(pres) > 1/2, the most likely location
      and part.
    pres_prob: [N, T] P(pres).
    where_prob: [N, T, L] probabilities of each location.
    what_prob: [N, T, K] probabilities of each part.
  """

  drawing: Drawing
  pres_prob: np.ndarray
  where_prob: np.ndarray
  what_prob: np.ndarray


class Frames(NamedTuple):
  """The drawing process: canvases [N, S, Hc, Wc, C] after each step, and their
  decoded images [N, S, H, W, C]."""

  canvases: np.ndarray
  decoded: np.ndarray


class Edited(NamedTuple):
  """A region swap (docs/model.md, section 9) of images A and B.

  Attributes:
    drawing: [1, 2T] A's drawn steps outside the region, then B's inside.
    canvas_a, canvas_b, canvas: [Hc, Wc, C] the canvases of A, B and the edit.
    decoded: [H, W, C] the edit decoded.
    parts_from_a, parts_from_b: the drawn steps taken from each.
  """

  drawing: Drawing
  canvas_a: np.ndarray
  canvas_b: np.ndarray
  canvas: np.ndarray
  decoded: np.ndarray
  parts_from_a: int
  parts_from_b: int


def _padded_batch(n: int) -> int:
  """The compiled batch size for n rows: the next power of two, at most MAX_BATCH."""
  return min(MAX_BATCH, 1 << max(0, n - 1).bit_length())


def _pad_rows(array: np.ndarray, size: int) -> np.ndarray:
  """array with zero rows appended up to `size` rows."""
  pad = [(0, size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
  return np.pad(array, pad)


def _in_batches(fn: Callable, *arrays: np.ndarray) -> list[np.ndarray]:
  """fn over the rows of arrays in padded batches; its outputs' rows, concatenated.

  fn returns a tuple of arrays with the batch as leading axis.
  """
  n = arrays[0].shape[0]
  outputs = []
  for start in range(0, n, MAX_BATCH):
    chunk = [a[start : start + MAX_BATCH] for a in arrays]
    size = chunk[0].shape[0]
    padded = _padded_batch(size)
    out = fn(*(_pad_rows(a, padded) for a in chunk))
    outputs.append([np.asarray(o)[:size] for o in out])
  return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]


class TrainedModel:
  """The trained networks, part bank and configuration of one run, as NumPy in
  and out (the eval stage draws its pictures with it; api.Run adds the run's
  test images).

  Args:
    config: the run's configuration.
    model: npdraw.make_model(config).
    variables: {'params': {encoder, decoder, prior}, 'batch_stats': {encoder, decoder}}.
    parts: [K, p, p, C] the part bank's parts, most used first.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: npdraw.NPDraw,
    variables: dict,
    parts,
  ):
    self.config, self.model = config, model
    self._variables = variables
    self._parts = jnp.asarray(parts)
    self.parts = np.asarray(parts)
    grid = model.grid

    def encode(variables, images):
      q, _ = npdraw.encode(model, variables, images, train=False)
      pres, where, what = npdraw.q_mode(q)
      probs = jax.nn.sigmoid(q['pres']), jax.nn.softmax(q['where']), jax.nn.softmax(q['what'])
      return (pres, where.astype(jnp.int32), what.astype(jnp.int32), *probs)

    def decode(variables, canvases):
      out, _ = npdraw.decode(model, variables, canvases, train=False)
      return (distributions.mean_image(model.likelihood, out, model.num_mixtures),)

    self._encode = jax.jit(encode)
    self._decode = jax.jit(decode)
    self._render = jax.jit(lambda *steps: (canvas_lib.render(grid, *steps),))
    self._render_steps = jax.jit(lambda *steps: (canvas_lib.render_steps(grid, *steps)[0],))
    self._samplers = {}

  # --- Sizes --------------------------------------------------------------------

  @property
  def num_steps(self) -> int:
    """T, the steps of a sampled or encoded drawing."""
    return self.model.prior.num_steps

  @property
  def num_parts(self) -> int:
    """K, the parts in the bank."""
    return self.parts.shape[0]

  @property
  def grid(self) -> canvas_lib.Grid:
    """The location grid: L = grid.num_locations locations, in raster order."""
    return self.model.grid

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of an image."""
    return (self.model.image_size, self.model.image_size, self.model.channels)

  @property
  def canvas_shape(self) -> tuple[int, int, int]:
    """(Hc, Wc, C) of a canvas."""
    return (self.grid.canvas_size, self.grid.canvas_size, self.model.channels)

  # --- Checks -------------------------------------------------------------------

  def check_images(self, images) -> np.ndarray:
    """images as float32 [N, H, W, C] in [0, 1]; a ValueError otherwise."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != self.image_shape or not images.shape[0]:
      raise ValueError(
        f'Expected images [N, {", ".join(map(str, self.image_shape))}], got {images.shape} '
        '(one image x: x[None]).'
      )
    if not (np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1):
      raise ValueError('Image values must lie in [0, 1].')
    return images

  def check_drawing(self, drawing: Drawing) -> Drawing:
    """drawing when its locations and parts exist in this run; a ValueError otherwise."""
    if not isinstance(drawing, Drawing):
      raise ValueError(f'Expected a Drawing, got {type(drawing).__name__}.')
    for name, count in (('where', self.grid.num_locations), ('what', self.num_parts)):
      values = getattr(drawing, name)
      if values.min() < 0 or values.max() >= count:
        raise ValueError(
          f'{name} must lie in [0, {count}); got values from {values.min()} to {values.max()}.'
        )
    return drawing

  def _padded_steps(self, drawing: Drawing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The steps padded with undrawn ones to a multiple of T: one compile per multiple."""
    steps = drawing.pres.shape[1]
    pad = -steps % self.num_steps
    return tuple(np.pad(x, [(0, 0), (0, pad)]) for x in (drawing.pres, drawing.where, drawing.what))

  # --- The model ----------------------------------------------------------------

  def sample(
    self, n: int, seed: int, temperature: float = 1.0, top_k: int | None = None
  ) -> Drawing:
    """n drawings [n, T] from the prior; the same (n, seed, ...) give the same drawings.

    temperature divides the prior's logits; top_k keeps the k most likely
    locations and parts at each step (None keeps all).
    """
    if n < 1:
      raise ValueError(f'n must be positive, got {n}.')
    if not temperature > 0:
      raise ValueError(f'temperature must be positive, got {temperature}.')
    if top_k is not None and top_k < 1:
      raise ValueError(f'top_k must be positive or None, got {top_k}.')
    batch = _padded_batch(n)
    key = (batch, top_k or 0)
    if key not in self._samplers:
      self._samplers[key] = sampling.make_sampler(self.model.prior, self.grid, batch, top_k or 0)
    sampler = self._samplers[key]
    chunks = []
    for c, start in enumerate(range(0, n, batch)):
      samples = sampler(
        self._variables['params']['prior'],
        self._parts,
        jax.random.fold_in(jax.random.key(seed), c),
        temperature,
      )
      chunks.append([np.asarray(x)[: n - start] for x in samples[:3]])
    return Drawing(*(np.concatenate(parts) for parts in zip(*chunks, strict=True)))

  def encode(self, images) -> Encoding:
    """q's most likely drawing [N, T] of images [N, H, W, C] and its probabilities."""
    images = self.check_images(images)
    pres, where, what, *probs = _in_batches(
      functools.partial(self._encode, self._variables), images
    )
    return Encoding(Drawing(pres, where, what), *probs)

  def render(self, drawing: Drawing) -> np.ndarray:
    """The finished canvases [N, Hc, Wc, C] of drawings [N, S]."""
    steps = self._padded_steps(self.check_drawing(drawing))
    (canvases,) = _in_batches(functools.partial(self._render, self._parts), *steps)
    return canvases

  def decode_canvases(self, canvases) -> np.ndarray:
    """The decoder's mean images [N, H, W, C] of canvases [N, Hc, Wc, C]."""
    canvases = np.asarray(canvases, np.float32)
    if canvases.ndim != 4 or canvases.shape[1:] != self.canvas_shape or not canvases.shape[0]:
      raise ValueError(
        f'Expected canvases [N, {", ".join(map(str, self.canvas_shape))}], got {canvases.shape}.'
      )
    (images,) = _in_batches(functools.partial(self._decode, self._variables), canvases)
    return images

  def decode(self, drawing: Drawing) -> np.ndarray:
    """The decoded images [N, H, W, C] of drawings [N, S]."""
    return self.decode_canvases(self.render(drawing))

  def reconstruct(self, images) -> np.ndarray:
    """Images [N, H, W, C] through q's most likely drawing and the decoder."""
    return self.decode(self.encode(images).drawing)

  def frames(self, drawing: Drawing) -> Frames:
    """The drawing process of drawings [N, S]: canvas and decoded image after each step."""
    steps = self._padded_steps(self.check_drawing(drawing))
    num_steps = drawing.pres.shape[1]
    (canvases,) = _in_batches(functools.partial(self._render_steps, self._parts), *steps)
    canvases = canvases[:, :num_steps]
    decoded = self.decode_canvases(canvases.reshape(-1, *self.canvas_shape))
    return Frames(canvases, decoded.reshape(*canvases.shape[:2], *self.image_shape))

  def edit(self, a, b, region: str | tuple[float, float, float, float]) -> Edited:
    """Region swap of images a and b [H, W, C]: b's parts inside the region, a's outside.

    region: 'top', 'bottom', 'left', 'right' or (x0, y0, x1, y1) in image
    pixels, as a tuple or the text 'x0,y0,x1,y1' (editing.parse_region).
    """
    images = self.check_images(np.stack([np.asarray(a), np.asarray(b)]))
    size = self.model.image_size
    if not isinstance(region, str):
      region = ','.join(map(str, np.asarray(region, float).ravel()))
    in_region = editing.locations_in_region(self.grid, editing.parse_region(region, size), size)
    both = self.encode(images).drawing
    steps = editing.compose(
      editing.Steps(*(x[0] for x in (both.pres, both.where, both.what))),
      editing.Steps(*(x[1] for x in (both.pres, both.where, both.what))),
      in_region,
    )
    drawing = Drawing(*(x[None] for x in steps))
    canvases = self.render(both)
    composed = self.render(drawing)
    return Edited(
      drawing,
      canvases[0],
      canvases[1],
      composed[0],
      self.decode_canvases(composed)[0],
      int(drawing.pres[0, : self.num_steps].sum()),
      int(drawing.pres[0, self.num_steps :].sum()),
    )
