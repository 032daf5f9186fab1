"""Frechet Inception Distance: features, streaming statistics, the distance.

  variables = fid.load_inception(path)          # the converted .npz (see convert_inception)
  features_fn = fid.make_feature_fn(variables)  # [N, H, W, C] in [0, 1] -> [N, 2048]
  moments = fid.init_moments()
  for images in batches:
    moments = fid.update_moments(moments, features_fn(images))
  mu, sigma = fid.mean_and_covariance(moments)
  score = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)

Preprocessing follows pytorch-fid's defaults, so scores are comparable with
it: bilinear resize to 299x299 (half-pixel centres, no antialiasing), scale
to [-1, 1]; grey images are repeated to three channels. Statistics are
accumulated in float64 NumPy on the host.
"""

import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from npdraw_jax import errors
from npdraw_jax.model.nets import inception

INPUT_SIZE = 299
CONVERT_COMMAND = (
  'python -m npdraw_jax.convert_inception '
  '--torch_weights=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz'
)


def save_inception(path: str, variables: dict) -> None:
  """Writes {'params', 'batch_stats'} as an .npz of float32 arrays named 'params/Mixed_5b/...'."""
  _check_variables(variables, source='the variables to save')
  flat = traverse_util.flatten_dict(variables, sep='/')
  with open(path, 'wb') as f:
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_inception(path: str) -> dict:
  """The FID Inception variables {'params', 'batch_stats'} from a converted .npz file."""
  if not os.path.isfile(path):
    raise errors.MissingArtifactError(
      f"No FID Inception weights at {path!r}. Convert pytorch-fid's weights with: {CONVERT_COMMAND}"
    )
  try:
    with np.load(path) as data:
      flat = {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise errors.ConfigError(
      f'{path!r} is not an .npz of FID Inception weights ({e}). Make one with: {CONVERT_COMMAND}'
    ) from e
  variables = traverse_util.unflatten_dict(flat, sep='/')
  _check_variables(variables, source=repr(path))
  return variables


def _check_variables(variables: dict, source: str) -> None:
  """Raises ValueError unless the names and shapes are exactly the network's."""
  want = {k: v.shape for k, v in traverse_util.flatten_dict(inception.variable_shapes()).items()}
  got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(variables).items()}
  missing = sorted('/'.join(k) for k in want.keys() - got.keys())
  unexpected = sorted('/'.join(k) for k in got.keys() - want.keys())
  misshapen = sorted(
    f'{"/".join(k)}: {got[k]} instead of {want[k]}'
    for k in want.keys() & got.keys()
    if got[k] != want[k]
  )
  problems = [
    f'{len(items)} {what} (e.g. {", ".join(items[:3])})'
    for what, items in (('missing', missing), ('unexpected', unexpected), ('misshapen', misshapen))
    if items
  ]
  if problems:
    raise ValueError(
      f'{source} does not hold the FID Inception variables: {"; ".join(problems)}. '
      f'Make the file with: {CONVERT_COMMAND}'
    )


def preprocess(images: jax.Array) -> jax.Array:
  """[N, H, W, C] in [0, 1], C = 1 or 3 -> [N, 299, 299, 3] in [-1, 1], as pytorch-fid."""
  chex.assert_rank(images, 4)
  n, _, _, channels = images.shape
  # antialias=False: torch's F.interpolate(mode='bilinear') does not filter when shrinking.
  x = jax.image.resize(
    images.astype(jnp.float32), (n, INPUT_SIZE, INPUT_SIZE, channels), 'bilinear', antialias=False
  )
  x = jnp.broadcast_to(x, (n, INPUT_SIZE, INPUT_SIZE, 3))
  return 2 * x - 1


def make_feature_fn(variables: dict) -> Callable[[jax.Array], jax.Array]:
  """images [N, H, W, C] float in [0, 1], C = 1 or 3 -> pool3 features [N, 2048] float32.

  Jitted once per input shape: keep the batch size fixed (pad the last batch)
  to avoid recompiling.
  """
  model = inception.FIDInceptionV3()
  variables = jax.device_put(variables)

  @jax.jit
  def features(variables, images):
    return model.apply(variables, preprocess(images))

  def features_fn(images: jax.Array) -> jax.Array:
    if np.ndim(images) != 4 or np.shape(images)[-1] not in (1, 3):
      raise ValueError(f'FID wants images [N, H, W, C] with C = 1 or 3, got {np.shape(images)}.')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'FID wants float images in [0, 1], got dtype {images.dtype}.')
    return features(variables, images)

  return features_fn


class Moments(NamedTuple):
  """Running float64 sums over feature vectors; sums from several hosts add up."""

  count: int
  total: np.ndarray  # [D]: sum of the features
  outer: np.ndarray  # [D, D]: sum of their outer products


def init_moments(dim: int = inception.FEATURES) -> Moments:
  """Moments of no features yet."""
  return Moments(0, np.zeros(dim), np.zeros((dim, dim)))


def update_moments(moments: Moments, features) -> Moments:
  """Adds a batch of features [N, D] to the sums."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[1] != moments.total.shape[0]:
    raise ValueError(f'Expected features [N, {moments.total.shape[0]}], got {x.shape}.')
  return Moments(moments.count + x.shape[0], moments.total + x.sum(0), moments.outer + x.T @ x)


def mean_and_covariance(moments: Moments) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (as np.cov) of all the features added."""
  n = moments.count
  if n < 2:
    raise ValueError(f'A covariance needs at least 2 feature vectors, got {n}.')
  mean = moments.total / n
  # Float64 sums lose ~1e-16 * |mean|^2 / variance: negligible for Inception features.
  covariance = (moments.outer - n * np.outer(mean, mean)) / (n - 1)
  return mean, covariance


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix."""
  eigenvalues, eigenvectors = np.linalg.eigh(matrix)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

  Tr (s1 s2)^(1/2) is the sum of the singular values of s1^(1/2) s2^(1/2): their
  squares are the eigenvalues of s1^(1/2) s2 s1^(1/2), which has the spectrum
  of s1 s2. No complex round-off, and singular covariances (fewer samples than
  dimensions) need no offset: the SVD never takes the square root of a
  round-off-sized eigenvalue.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
      f'Expected means [D] and covariances [D, D] of one D, got {mu1.shape}, {sigma1.shape}, '
      f'{mu2.shape}, {sigma2.shape}.'
    )
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
  trace_sqrt = np.sum(np.linalg.svd(_sqrt_psd(sigma1) @ _sqrt_psd(sigma2), compute_uv=False))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


# --- FID of two image streams ----------------------------------------------------------

# Seed streams of the Bernoulli draws of the binary protocol.
_FAKE_NOISE, _REAL_NOISE = 1, 2


def _pad_to(batch: np.ndarray, size: int) -> np.ndarray:
  """The batch with zero images appended up to `size`: one shape, one compile."""
  pad = size - batch.shape[0]
  return np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)]) if pad else batch


def feature_moments(
  features_fn: Callable[[np.ndarray], jax.Array], batches: Iterable[np.ndarray], batch_size: int
) -> Moments:
  """Running moments of the features of every image in batches of at most batch_size.

  The features' width is features_fn's (Inception's by default, when no batch comes).
  """
  moments = None
  for batch in batches:
    features = np.asarray(features_fn(_pad_to(batch, batch_size)))
    if moments is None:
      moments = init_moments(features.shape[1])
    moments = update_moments(moments, features[: batch.shape[0]])
  return init_moments() if moments is None else moments


def _counted(batches: Iterable[np.ndarray], bar: tqdm) -> Iterator[np.ndarray]:
  """The batches, advancing the progress bar by each batch's size."""
  for batch in batches:
    yield batch
    bar.update(batch.shape[0])


def bernoulli_draws(batches: Iterable[np.ndarray], seed: int, stream: int) -> Iterator[np.ndarray]:
  """Each batch of images in [0, 1] as one Bernoulli draw per pixel, in {0, 1}.

  Batch b draws from the NumPy generator [seed, stream, b]: repeatable.
  """
  for b, batch in enumerate(batches):
    uniform = np.random.default_rng([seed, stream, b]).random(batch.shape, dtype=np.float32)
    # u < p with u in [0, 1): p = 0 never fires, p = 1 always does.
    yield (uniform < batch).astype(np.float32)


def images_fid(
  features_fn: Callable[[np.ndarray], jax.Array],
  fake: Iterable[np.ndarray],
  real: Iterable[np.ndarray],
  batch_size: int,
  binarize_seed: int | None,
  total: int | None = None,
) -> float:
  """FID between two streams of image batches [n <= batch_size, H, W, C] in [0, 1].

  With binarize_seed (the authors' protocol for binary data) both streams are
  Bernoulli-drawn (bernoulli_draws, a stream each) before the features.
  total: the number of images, for the progress bar.
  """
  if binarize_seed is not None:
    fake = bernoulli_draws(fake, binarize_seed, _FAKE_NOISE)
    real = bernoulli_draws(real, binarize_seed, _REAL_NOISE)
  with tqdm(total=total, desc='FID', unit='image') as bar:
    fake_moments = feature_moments(features_fn, _counted(fake, bar), batch_size)
    real_moments = feature_moments(features_fn, _counted(real, bar), batch_size)
  return frechet_distance(*mean_and_covariance(fake_moments), *mean_and_covariance(real_moments))
