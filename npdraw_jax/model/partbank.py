"""The part bank: k-means centres of image patches (docs/model.md, section 2).

Patches come from a dense grid over the training images at canvas resolution;
near-empty ones are dropped and a random subset is clustered. Seeding
(k-means++) and Lloyd iterations run in JAX under jit; distances are computed
a chunk of points at a time so memory stays bounded for large K and many
patches.
"""

import dataclasses
import functools
from collections.abc import Iterator

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Up to this many candidate patches, sample them without replacement from an
# explicit permutation; beyond it, draw positions at random in chunks.
_EXACT_SAMPLING_LIMIT = 1 << 23
_CANDIDATE_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class PartBank:
  """Parts sorted by cluster size, largest first.

  Attributes:
    parts: [K, p, p, C] float32 cluster centres.
    counts: [K] int64 patches assigned to each part.
    inertia: sum of squared distances of the clustered patches to their part.
    num_patches: patches clustered.
    iterations: Lloyd iterations run.
    settings: the configuration that produced the bank.
  """

  parts: np.ndarray
  counts: np.ndarray
  inertia: float
  num_patches: int
  iterations: int
  settings: dict


def patch_grid_shape(image_shape: tuple[int, ...], patch_size: int, stride: int):
  """Patch positions per image along rows and columns: ((H - p) // s + 1, ...)."""
  h, w = image_shape[1:3]
  if patch_size > min(h, w):
    raise ValueError(f'patch_size {patch_size} exceeds the images {image_shape}.')
  return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def gather_patches(
  images: np.ndarray, flat_ids: np.ndarray, patch_size: int, stride: int
) -> np.ndarray:
  """The patches with the given flat ids over (image, grid row, grid col).

  Args:
    images: [N, H, W, C].
    flat_ids: [M] ints in [0, N * Gy * Gx).
    patch_size: p.
    stride: grid spacing.

  Returns:
    [M, p, p, C] patches.
  """
  gy, gx = patch_grid_shape(images.shape, patch_size, stride)
  n, row, col = np.unravel_index(flat_ids, (images.shape[0], gy, gx))
  offsets = np.arange(patch_size)
  rows = (row * stride)[:, None, None] + offsets[None, :, None]
  cols = (col * stride)[:, None, None] + offsets[None, None, :]
  return images[n[:, None, None], rows, cols]


def _candidate_ids(rng: np.random.Generator, total: int) -> Iterator[np.ndarray]:
  """Random patch ids: a permutation when small, random draws when huge."""
  if total <= _EXACT_SAMPLING_LIMIT:
    yield from np.array_split(rng.permutation(total), -(-total // _CANDIDATE_CHUNK))
    return
  # Drawn with replacement: duplicates are negligible when total >> M. Giving
  # up after `total` draws bounds the loop for almost-empty data.
  for _ in range(-(-total // _CANDIDATE_CHUNK)):
    yield rng.integers(total, size=_CANDIDATE_CHUNK)


def sample_patches(
  images: np.ndarray,
  patch_size: int,
  stride: int,
  empty_threshold: float,
  max_patches: int,
  seed: int,
) -> np.ndarray:
  """A random subset of at most max_patches non-empty grid patches.

  Args:
    images: [N, H, W, C] float in [0, 1].
    patch_size: p.
    stride: spacing of the dense patch grid.
    empty_threshold: patches whose mean intensity is below it are dropped.
    max_patches: M.
    seed: seeds the choice.

  Returns:
    [M', p, p, C] float32 with M' <= M, in random order.
  """
  chex.assert_rank(images, 4)
  gy, gx = patch_grid_shape(images.shape, patch_size, stride)
  rng = np.random.default_rng(seed)
  kept, count = [], 0
  for ids in _candidate_ids(rng, images.shape[0] * gy * gx):
    patches = gather_patches(images, ids, patch_size, stride)
    patches = patches[patches.mean(axis=(1, 2, 3)) >= empty_threshold]
    kept.append(patches[: max_patches - count])
    count += len(kept[-1])
    if count >= max_patches:
      break
  if count == 0:
    raise ValueError(
      f'No patch has a mean intensity >= {empty_threshold}: lower partbank.empty_threshold.'
    )
  return np.concatenate(kept).astype(np.float32)


def _squared_distances(points: jax.Array, centres: jax.Array) -> jax.Array:
  """||x - c||^2 for every pair, [M, K]; clipped at 0 against round-off."""
  cross = points @ centres.T
  sq = jnp.sum(points**2, axis=1, keepdims=True) + jnp.sum(centres**2, axis=1)
  return jnp.maximum(sq - 2 * cross, 0.0)


def _assign(points: jax.Array, centres: jax.Array, chunk_size: int):
  """Nearest centre and squared distance of every point, a chunk at a time."""
  m = points.shape[0]
  padded = -(-m // chunk_size) * chunk_size
  chunks = jnp.pad(points, ((0, padded - m), (0, 0))).reshape(-1, chunk_size, points.shape[1])

  def one_chunk(chunk):
    d = _squared_distances(chunk, centres)
    return jnp.argmin(d, axis=1), jnp.min(d, axis=1)

  labels, dists = jax.lax.map(one_chunk, chunks)
  return labels.reshape(-1)[:m], dists.reshape(-1)[:m]


@functools.partial(jax.jit, static_argnames='num_clusters')
def kmeans_plusplus(key: jax.Array, points: jax.Array, num_clusters: int) -> jax.Array:
  """k-means++ seeding: each new centre drawn with probability ~ D(x)^2.

  Args:
    key: PRNG key.
    points: [M, D].
    num_clusters: K.

  Returns:
    [K, D] initial centres (rows of points).
  """
  chex.assert_rank(points, 2)
  keys = jax.random.split(key, num_clusters)
  first = jax.random.randint(keys[0], (), 0, points.shape[0])
  centres = jnp.zeros((num_clusters, points.shape[1]), points.dtype)
  centres = centres.at[0].set(points[first])
  nearest = jnp.sum((points - points[first]) ** 2, axis=1)

  def add_centre(k, carry):
    centres, nearest = carry
    # log(0) = -inf: points already chosen are never drawn again.
    pick = jax.random.categorical(keys[k], jnp.log(nearest))
    centres = centres.at[k].set(points[pick])
    nearest = jnp.minimum(nearest, jnp.sum((points - points[pick]) ** 2, axis=1))
    return centres, nearest

  centres, _ = jax.lax.fori_loop(1, num_clusters, add_centre, (centres, nearest))
  return centres


@functools.partial(jax.jit, static_argnames=('max_iters', 'chunk_size'))
def kmeans(
  points: jax.Array,
  init_centres: jax.Array,
  max_iters: int,
  tol: float,
  chunk_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Lloyd iterations from the given centres.

  Stops when the summed squared centre movement falls to tol times the mean
  per-feature variance of the points (scikit-learn's criterion) or after
  max_iters. An empty cluster keeps its centre.

  Args:
    points: [M, D].
    init_centres: [K, D].
    max_iters: iteration cap.
    tol: relative tolerance.
    chunk_size: points per distance computation.

  Returns:
    centres [K, D], counts [K], inertia (scalar, for the returned centres),
    and the number of iterations run.
  """
  chex.assert_rank([points, init_centres], 2)
  num_clusters = init_centres.shape[0]
  threshold = tol * jnp.mean(jnp.var(points, axis=0))

  def update(centres):
    labels, _ = _assign(points, centres, chunk_size)
    sums = jax.ops.segment_sum(points, labels, num_clusters)
    counts = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_clusters)
    means = sums / jnp.maximum(counts, 1)[:, None]
    return jnp.where(counts[:, None] > 0, means, centres)

  def keep_going(state):
    _, shift, it = state
    return (it < max_iters) & (shift > threshold)

  def step(state):
    centres, _, it = state
    new = update(centres)
    return new, jnp.sum((new - centres) ** 2), it + 1

  centres, _, iters = jax.lax.while_loop(keep_going, step, (init_centres, jnp.inf, jnp.asarray(0)))
  labels, dists = _assign(points, centres, chunk_size)
  counts = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_clusters)
  return centres, counts, jnp.sum(dists), iters


def build(
  images: np.ndarray,
  *,
  num_parts: int,
  patch_size: int,
  extract_stride: int,
  empty_threshold: float,
  max_patches: int,
  max_iters: int,
  tol: float,
  chunk_size: int,
  seed: int,
  settings: dict | None = None,
) -> PartBank:
  """Builds the part bank from training images at canvas resolution.

  Args:
    images: [N, Hc, Wc, C] float in [0, 1].
    num_parts: K.
    patch_size: p.
    extract_stride: stride of the dense patch grid.
    empty_threshold: minimum patch mean intensity kept (0: keep all).
    max_patches: patches clustered at most.
    max_iters: Lloyd iterations at most.
    tol: Lloyd tolerance (see `kmeans`).
    chunk_size: points per distance chunk.
    seed: seeds patch sampling and k-means++.
    settings: recorded in the bank as given.

  Returns:
    The PartBank, parts sorted by cluster size.
  """
  patches = sample_patches(images, patch_size, extract_stride, empty_threshold, max_patches, seed)
  if len(patches) < num_parts:
    raise ValueError(
      f'Only {len(patches)} patches for K = {num_parts} parts: lower model.K or '
      'partbank.empty_threshold, or give more images.'
    )
  points = jnp.asarray(patches.reshape(len(patches), -1))
  init = kmeans_plusplus(jax.random.key(seed), points, num_parts)
  centres, counts, inertia, iters = kmeans(points, init, max_iters, tol, chunk_size)
  centres, counts = np.asarray(centres), np.asarray(counts)
  order = np.argsort(-counts, kind='stable')
  return PartBank(
    parts=centres[order].reshape(num_parts, *patches.shape[1:]),
    counts=counts[order].astype(np.int64),
    inertia=float(inertia),
    num_patches=len(patches),
    iterations=int(iters),
    settings=dict(settings or {}),
  )
