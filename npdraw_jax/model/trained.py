"""A trained NP-DRAW with NumPy in and out: sample, encode, render, decode and
edit drawings. api.Run adds a run directory's test images.

Images are float32 [N, H, W, C] in [0, 1] at the run's image size; canvases
[N, Hc, Wc, C] at its canvas size. A Drawing holds N drawings of S steps (S is
usually the run's T, but any S >= 1 renders: an edit joins two drawings into
2T steps). The networks are compiled once per padded shape: batches are padded
to a power of two (at most MAX_BATCH per pass) and steps to a multiple of T, so
repeated calls of similar sizes reuse the compiled functions.

Every integer argument (counts, seeds, top_k, locations, parts) is checked as
an integer in its range before any cast: a float, a bool or an integer beyond
the range is a ValueError, never truncated or wrapped by a cast to int32.
"""

import dataclasses
import functools
import math
import numbers
import operator
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import distributions, editing, npdraw, sampling

MAX_BATCH = 64  # Images, drawings or canvases per compiled pass.
MAX_SAMPLERS = 4  # Compiled samplers kept, the most recently used: each holds its executable.
INT32_END = 2**31  # int32 holds [-INT32_END, INT32_END).
SEED_END = 2**32  # Seeds lie in [0, SEED_END): JAX keeps 32 bits of a seed, so larger ones wrap.


def _shown(value) -> str:
  """value's repr for a message, cut short: a hostile number may have thousands of digits."""
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + '...'


def check_int(name: str, value, low: int, end: int) -> int:
  """value as a Python int in [low, end); a ValueError for a float, a bool, a
  string or an integer outside the range."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} must be an integer, got the bool {value}.')
  try:
    number = operator.index(value)  # Ints and NumPy integers; not floats, even 2.0.
  except TypeError:
    raise ValueError(f'{name} must be an integer, got {_shown(value)}.') from None
  if not low <= number < end:
    raise ValueError(f'{name} must lie in [{low}, {end}), got {_shown(number)}.')
  return number


def check_positive_float(name: str, value) -> float:
  """value as a finite positive float; a ValueError otherwise (bools and strings too)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f'{name} must be a number, got {_shown(value)}.')
  try:
    number = float(value)
  except OverflowError:  # An int beyond float's range.
    number = math.inf
  if not (math.isfinite(number) and number > 0):
    raise ValueError(f'{name} must be positive and finite, got {_shown(value)}.')
  return number


def _is_integer(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_integers(name: str, values, low: int, end: int) -> np.ndarray:
  """values as an int32 array when each is an integer in [low, end), a range
  within int32's; a ValueError otherwise, decided on the values as given."""
  if hasattr(values, 'dtype'):
    array = np.asarray(values)
    if array.dtype.kind not in 'iuO' or (
      array.dtype.kind == 'O' and not all(map(_is_integer, array.ravel()))
    ):
      raise ValueError(f'{name} must hold integers, got {array.dtype} values.')
  else:
    # Python numbers, seen before NumPy would turn [True, 2] or [2.0] into ints.
    array = np.asarray(values, dtype=object)
    odd = [v for v in array.ravel() if not _is_integer(v)]
    if odd:
      raise ValueError(f'{name} must hold integers, got {_shown(odd[0])}.')
  if array.size:
    smallest, largest = int(array.min()), int(array.max())
    if not low <= smallest <= largest < end:
      raise ValueError(
        f'{name} must lie in [{low}, {end}); got values from {_shown(smallest)} to '
        f'{_shown(largest)}.'
      )
  return array.astype(np.int32)


def check_flags(name: str, values) -> np.ndarray:
  """values as a bool array when they are bools (or the integers 0 and 1); a
  ValueError for floats or other integers."""
  array = np.asarray(values)
  if array.dtype.kind == 'b':
    return array
  try:
    return check_integers(name, values, 0, 2).astype(bool)
  except ValueError as e:
    raise ValueError(f'{name} must hold bools (or 0 and 1): {e}') from None


@dataclasses.dataclass(frozen=True)
class Drawing:
  """N drawings of S steps: step s of drawing n pastes part what[n, s] at grid
  location where[n, s] when pres[n, s] is set.

  Attributes:
    pres: [N, S] bool (given as bools, or the integers 0 and 1).
    where: [N, S] int32 in [0, L), L the run's grid locations.
    what: [N, S] int32 in [0, K), K the run's parts.

  Locations and parts must be given as integers that int32 holds (a ValueError
  otherwise); whether they exist in a run is the run's check (check_drawing).
  """

  pres: np.ndarray
  where: np.ndarray
  what: np.ndarray

  def __post_init__(self):
    arrays = {
      'pres': check_flags('pres', self.pres),
      'where': check_integers('where', self.where, -INT32_END, INT32_END),
      'what': check_integers('what', self.what, -INT32_END, INT32_END),
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
    self._samplers = {}  # (batch, top_k) -> sampler, the most recently used last.
    self.max_samplers = MAX_SAMPLERS

  @property
  def variables(self) -> dict:
    """The networks' variables, as given: with config, model and parts, what
    builds this model again (under another configuration, say)."""
    return self._variables

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

    seed: an integer in [0, 2**32) (JAX keeps 32 bits: larger ones would wrap).
    temperature divides the prior's logits. top_k keeps the k most likely
    locations and parts at each step (one k for both, as the prior's sampler
    applies it); None keeps all. A k of at least max(K, L) keeps all too: it is
    clamped to None, and shares None's compiled sampler.
    """
    n = check_int('n', n, 1, INT32_END)
    seed = check_int('seed', seed, 0, SEED_END)
    temperature = check_positive_float('temperature', temperature)
    batch = _padded_batch(n)
    sampler = self._sampler(batch, self._sampler_top_k(top_k))
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

  def _sampler_top_k(self, top_k: int | None) -> int:
    """The sampler's k for top_k: 0 keeps all, for None and for every k >= max(K, L)."""
    if top_k is None:
      return 0
    top_k = check_int('top_k', top_k, 1, INT32_END)
    return 0 if top_k >= max(self.num_parts, self.grid.num_locations) else top_k

  def _sampler(self, batch: int, top_k: int) -> Callable:
    """The compiled sampler for (batch, top_k); at most max_samplers are kept,
    the least recently used dropped first (its executable with it)."""
    sampler = self._samplers.pop((batch, top_k), None)
    if sampler is None:
      sampler = sampling.make_sampler(self.model.prior, self.grid, batch, top_k)
    self._samplers[(batch, top_k)] = sampler
    while len(self._samplers) > self.max_samplers:
      del self._samplers[next(iter(self._samplers))]
    return sampler

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
