"""The eval stage: importance-weighted NLL on the test split, and pictures.

  run(config, workdir)

restores the trained model (the checkpoint with the best held-out bound when
data.holdout_size > 0, else the last), computes per test image the
importance-weighted bound at each S of eval.iwae_samples (hard samples, spec
section 8), the single-sample bound and the authors' estimate
nll_authors_{eval.authors_samples} (not a bound, section 11), and, when
eval.fid_weights names an Inception file, the FID of prior samples against the
test split; writes the means and standard errors to DIR/metrics.jsonl (stage
'eval', split 'test'), and draws DIR/samples.png, DIR/reconstructions.png and
DIR/drawing.gif; DIR/eval.json records the evaluated checkpoint, the eval
settings and the summary, so that a rerun of the same eval is skipped. It
reads the earlier stages' outputs only. The VAE stage reuses make_eval_step
and test_bounds on the held-out images.
"""

import collections
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from npdraw_jax import (
  api,
  artifacts,
  checkpointing,
  distributions,
  errors,
  fid,
  input_pipeline,
  npdraw,
  partbank,
  pictures,
  pipeline,
  sampling,
  sharding,
  train_lib,
  train_prior,
  train_vae,
)

STAGE = 'eval'
SAMPLES_FILE = 'samples.png'
RECONSTRUCTIONS_FILE = 'reconstructions.png'
DRAWING_FILE = 'drawing.gif'
EVAL_RECORD_FILE = 'eval.json'  # The evaluated checkpoint, settings and summary.
DRAWING_SAMPLES = 8  # Prior samples animated in drawing.gif.
# Seed streams of the Bernoulli draws of FID's binary protocol.
_FID_FAKE_NOISE, _FID_REAL_NOISE = 1, 2


def iwae_sample_counts(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """eval.iwae_samples (one S or several) as a sorted tuple."""
  counts = config.eval.iwae_samples
  counts = (counts,) if isinstance(counts, int) else tuple(counts)
  if not counts or min(counts) < 1:
    raise ValueError(f'eval.iwae_samples must hold positive sample counts, got {counts}.')
  return tuple(sorted(set(counts)))


def sample_chunk(num_samples: int, chunk_size: int, field: str) -> int:
  """Samples per compiled pass when drawing num_samples (the config field
  `field`): min(eval.chunk_size, num_samples), which must divide it."""
  chunk = min(chunk_size, num_samples)
  if num_samples < 1 or chunk < 1 or num_samples % chunk:
    raise errors.ConfigError(
      f'{field} = {num_samples} must be positive and a multiple of eval.chunk_size '
      f'= {chunk_size} when larger than it.'
    )
  return chunk


def _open_trained_vae(config, workdir, allow_changed_settings):
  """(checkpoints, best or None) of the finished stage 2, read-only; clear
  errors naming the stage to run when an upstream output is missing."""
  # The parses list every training example: no need to load the images.
  num_train = len(train_prior.load_parses(config, workdir, 'train')['pres'])
  train_prior.open_trained(config, workdir, allow_changed_settings).close()
  checkpoints = train_vae.open_checkpoints(config, workdir, allow_changed_settings, read_only=True)
  wanted = train_vae.num_train_steps(config, num_train)
  if (checkpoints.latest_step() or 0) < wanted:
    checkpoints.close()
    raise errors.MissingArtifactError(
      f'The eval stage needs the VAE trained to step {wanted} in {checkpoints.directory} '
      f'(found: {checkpoints.latest_step()}): run the vae stage first.'
    )
  best = None
  if config.data.holdout_size > 0:
    best = train_vae.open_best_checkpoint(workdir, read_only=True)
    if best.best() is None:
      best.close()
      best = None
  return checkpoints, best


def evaluated_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> dict:
  """{'which': 'best' or 'last', 'step'} of the VAE checkpoint that the eval
  stage (and restore_trained_model) uses; reads only."""
  checkpoints, best = _open_trained_vae(config, workdir, allow_changed_settings)
  chosen = (
    {'which': 'last', 'step': checkpoints.latest_step()}
    if best is None
    else {'which': 'best', 'step': best.best()[0]}
  )
  if best:
    best.close()
  checkpoints.close()
  return chosen


def restore_trained_model(
  config: ml_collections.ConfigDict, workdir: str, mesh, allow_changed_settings: bool = False
):
  """(model, state) of the finished stage 2; a clear error when it is not.

  The state is the VAE checkpoint with the best held-out bound when
  data.holdout_size > 0 and one was kept, else the last; the log says which.
  Reads only: nothing in workdir is written.
  """
  checkpoints, best = _open_trained_vae(config, workdir, allow_changed_settings)
  model = npdraw.make_model(config)
  prior_params = train_prior.restore_trained_params(config, workdir, mesh, allow_changed_settings)
  init_fn = train_vae.make_init_fn(config, model, prior_params)
  if best is None:
    logging.info('Using the last VAE checkpoint, step %d.', checkpoints.latest_step())
    state = train_lib.restore_or_init(checkpoints, init_fn, mesh)
  else:
    found = best.best()
    logging.info(
      'Using the VAE checkpoint with the best held-out bound: step %d, held-out %s %.4f '
      '(the last checkpoint is step %d).',
      found[0],
      best.metric,
      found[1],
      checkpoints.latest_step(),
    )
    state = best.restore(train_lib.abstract_state(init_fn, mesh))
    best.close()
  checkpoints.close()
  return model, state


def make_eval_step(
  model: npdraw.NPDraw,
  mesh,
  sample_counts: tuple[int, ...],
  chunk_size: int,
  authors_samples: int = 0,
):
  """Jitted (variables, bank, batch, key) -> per-image bounds and 'mask' [B].

  The bounds of npdraw.iwae_bounds at sample_counts; with authors_samples =
  S > 0 also f'nll_authors_{S}' (from the first S of the same samples). At
  most chunk_size samples per pass. The outputs are replicated so that every
  process sees the whole global batch.
  """
  if authors_samples < 0:
    raise errors.ConfigError(
      f'eval.authors_samples must be 0 (off) or positive, got {authors_samples}.'
    )
  num_samples = npdraw.samples_drawn(sample_counts, authors_samples)
  field = 'eval.authors_samples' if authors_samples > max(sample_counts) else 'eval.iwae_samples'
  chunk = sample_chunk(num_samples, chunk_size, field)

  def eval_step(variables, bank, batch, key):
    out = npdraw.iwae_bounds(
      model, variables, bank, batch['image'], key, sample_counts, chunk, authors_samples
    )
    return {**out, 'mask': batch['mask']}

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
    eval_step, in_shardings=(replicated, replicated, batched, replicated), out_shardings=replicated
  )


def summarise(per_image: dict[str, np.ndarray], num_dims: int, is_8bit: bool) -> dict[str, float]:
  """Means over test images, standard errors of the means, and bits/dim.

  per_image holds 'elbo' and 'nll_iwae_{S}' for one or more S; the summary adds
  'nll_iwae' (and 'bits_per_dim' for 8-bit data), the bound at the largest S,
  'iwae_samples', that S, and 'test_images', the number of images.
  """
  largest = max(int(name.rsplit('_', 1)[1]) for name in per_image if name.startswith('nll_iwae_'))
  per_image = {**per_image, 'nll_iwae': per_image[f'nll_iwae_{largest}']}
  out = {}
  for name, values in per_image.items():
    out[name] = float(np.mean(values))
    out[f'{name}_stderr'] = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    if is_8bit and name.startswith('nll_iwae'):
      out[name.replace('nll_iwae', 'bits_per_dim')] = out[name] / (num_dims * math.log(2))
  out['iwae_samples'] = largest
  out['test_images'] = len(per_image['nll_iwae'])
  return out


def test_bounds(
  config: ml_collections.ConfigDict,
  test: input_pipeline.Split,
  mesh,
  bounds_fn: Callable[[dict, jax.Array], dict],
  is_8bit: bool,
  description: str = '',
) -> dict[str, float]:
  """The summary (see summarise) of per-image bounds over the whole split `test`
  (the test split or the held-out one, whole on every process: each process
  serves its part of each global batch, and every process gets every bound).

  bounds_fn(global batch {'image', 'mask'}, key) -> per-image bounds and 'mask',
  replicated; eval_batches binarises the images alike for every model and every
  call, and the keys are the same at every call (a fair comparison of
  checkpoints). description: the progress bar's, by default the eval's S.
  """
  batch_size = config.eval.batch_size
  sharding.check_batch_size(batch_size, 'eval.batch_size')
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  per_image = collections.defaultdict(list)
  batches = input_pipeline.eval_batches(
    test, config.data, batch_size, config.seed, jax.process_index(), jax.process_count()
  )
  num_batches = -(-test.num_examples // batch_size)
  description = description or f'{STAGE} (S = {", ".join(map(str, iwae_sample_counts(config)))})'
  for b, batch in enumerate(tqdm(batches, total=num_batches, desc=description, unit='batch')):
    batch = sharding.to_global({'image': batch['image'], 'mask': batch['mask']}, mesh)
    bounds = jax.device_get(bounds_fn(batch, jax.random.fold_in(key, b)))
    mask = bounds.pop('mask')
    for name, values in bounds.items():
      per_image[name].append(values[mask])
  per_image = {k: np.concatenate(v) for k, v in per_image.items()}
  image_dims = config.data.image_size**2 * config.data.channels
  return summarise(per_image, image_dims, is_8bit)


def eval_record_key(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> dict:
  """What an eval's results depend on: the evaluated checkpoint (which, step
  and its stage's settings record) and the eval's own settings."""
  checkpoint = evaluated_checkpoint(config, workdir, allow_changed_settings)
  checkpoint['record'] = checkpointing.read_record(os.path.join(workdir, train_vae.STAGE))
  settings = checkpointing.config_fields(
    config, ('seed', 'eval', 'prior.sample_temperature', 'prior.sample_top_k')
  )
  return {'checkpoint': checkpoint, 'settings': settings}


def _recorded_summary(workdir: str, key: dict) -> dict[str, float] | None:
  """The summary in DIR/eval.json when it records an eval under `key` and its
  pictures are there, else None."""
  path = os.path.join(workdir, EVAL_RECORD_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  pictures_there = all(
    os.path.exists(os.path.join(workdir, name))
    for name in (SAMPLES_FILE, RECONSTRUCTIONS_FILE, DRAWING_FILE)
  )
  if {k: record.get(k) for k in key} != json.loads(json.dumps(key)) or not pictures_there:
    return None
  return record['summary']


def run(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> dict[str, float]:
  """Evaluates the trained model on the whole test split; returns the summary.

  An eval of the same checkpoint under the same eval settings recorded in
  DIR/eval.json is not repeated: its summary is logged and returned. The eval
  reads the earlier stages' outputs only; in a workdir it cannot write, the
  summary is logged but not recorded.
  allow_changed_settings: evaluate checkpoints trained under training
  settings other than the configuration's (else that is an error).
  """
  key = eval_record_key(config, workdir, allow_changed_settings)
  recorded = _recorded_summary(workdir, key)
  if recorded is not None:
    logging.info(
      'Stage %s: the %s VAE checkpoint (step %d) is already evaluated under these settings '
      '(%s); skipping. Its summary: %s',
      STAGE,
      key['checkpoint']['which'],
      key['checkpoint']['step'],
      os.path.join(workdir, EVAL_RECORD_FILE),
      recorded,
    )
    return recorded
  # A bad weights file fails here, not after hours of importance sampling.
  inception = fid.load_inception(config.eval.fid_weights) if config.eval.fid_weights else None
  mesh = sharding.make_mesh()
  model, state = restore_trained_model(config, workdir, mesh, allow_changed_settings)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  bank = sharding.replicate(
    jnp.asarray(partbank.load(os.path.join(workdir, pipeline.PARTBANK_FILE)).parts), mesh
  )
  # Every process holds the whole test split and serves its part of each batch.
  test = input_pipeline.load_split(config.data, 'test')
  eval_step = make_eval_step(
    model, mesh, iwae_sample_counts(config), config.eval.chunk_size, config.eval.authors_samples
  )
  summary = test_bounds(
    config,
    test,
    mesh,
    lambda batch, key: eval_step(variables, bank, batch, key),
    is_8bit=model.likelihood != 'bernoulli',
  )
  if inception is None:
    logging.info('FID skipped: eval.fid_weights is not set (see the README, "FID").')
  elif jax.process_index() == 0:
    summary['fid'] = compute_fid(
      config, inception, model, sharding.local_copy(variables), sharding.local_copy(bank), test
    )
  logging.info('Stage %s on %d test images: %s', STAGE, summary['test_images'], summary)
  if not os.access(workdir, os.W_OK):
    logging.warning('%s is not writable: the summary is logged only, not recorded.', workdir)
    return summary
  metrics_log = train_lib.MetricsLog(workdir, STAGE)
  metrics_log.write(int(state.step), 'test', summary)
  metrics_log.close()
  if jax.process_index() == 0:
    write_pictures(
      config, workdir, model, sharding.local_copy(variables), sharding.local_copy(bank), test
    )
    # Last: a record means that the metrics and pictures are written.
    artifacts.save_json(os.path.join(workdir, EVAL_RECORD_FILE), {**key, 'summary': summary})
  return summary


def _pad_to(batch: np.ndarray, size: int) -> np.ndarray:
  """The batch with zero images appended up to `size`: one shape, one compile."""
  pad = size - batch.shape[0]
  return np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)]) if pad else batch


def feature_moments(
  features_fn: Callable[[np.ndarray], jax.Array], batches: Iterable[np.ndarray], batch_size: int
) -> fid.Moments:
  """Running moments of the features of every image in batches of at most batch_size.

  The features' width is features_fn's (Inception's by default, when no batch comes).
  """
  moments = None
  for batch in batches:
    features = np.asarray(features_fn(_pad_to(batch, batch_size)))
    if moments is None:
      moments = fid.init_moments(features.shape[1])
    moments = fid.update_moments(moments, features[: batch.shape[0]])
  return fid.init_moments() if moments is None else moments


def _counted(batches: Iterable[np.ndarray], bar: tqdm) -> Iterator[np.ndarray]:
  """The batches, advancing the progress bar by each batch's size."""
  for batch in batches:
    yield batch
    bar.update(batch.shape[0])


def generated_images(
  config: ml_collections.ConfigDict, model: npdraw.NPDraw, variables, bank, count: int
) -> Iterator[np.ndarray]:
  """`count` images from the model in batches: prior samples, decoded to mean images."""
  batch_size = config.eval.batch_size
  sampler = sampling.make_sampler(model.prior, model.grid, batch_size, config.prior.sample_top_k)
  decode = jax.jit(
    lambda canvas: distributions.mean_image(
      model.likelihood, npdraw.decode(model, variables, canvas, train=False)[0], model.num_mixtures
    )
  )
  key = jax.random.fold_in(jax.random.key(config.seed), 5)
  for b, start in enumerate(range(0, count, batch_size)):
    samples = sampler(
      variables['params']['prior'],
      bank,
      jax.random.fold_in(key, b),
      config.prior.sample_temperature,
    )
    yield np.asarray(decode(samples.canvases[:, -1]))[: count - start]


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
    fake = bernoulli_draws(fake, binarize_seed, _FID_FAKE_NOISE)
    real = bernoulli_draws(real, binarize_seed, _FID_REAL_NOISE)
  with tqdm(total=total, desc='FID', unit='image') as bar:
    fake_moments = feature_moments(features_fn, _counted(fake, bar), batch_size)
    real_moments = feature_moments(features_fn, _counted(real, bar), batch_size)
  return fid.frechet_distance(
    *fid.mean_and_covariance(fake_moments), *fid.mean_and_covariance(real_moments)
  )


def compute_fid(
  config: ml_collections.ConfigDict, inception: dict, model, variables, bank, test
) -> float:
  """FID between eval.fid_samples decoded prior samples and the images of `test`.

  Generated images are the decoder's mean images (no pixel noise); test images
  are the stored ones (grey levels for binarised data). With
  eval.fid_binarize both are Bernoulli-binarised first (the authors' protocol
  for MNIST). `inception` holds the variables of fid.load_inception.
  """
  batch_size, count = config.eval.batch_size, config.eval.fid_samples
  real = (
    test.images[start : start + batch_size].astype(np.float32) / 255.0
    for start in range(0, test.num_examples, batch_size)
  )
  score = images_fid(
    fid.make_feature_fn(inception),
    generated_images(config, model, variables, bank, count),
    real,
    batch_size,
    binarize_seed=config.seed if config.eval.fid_binarize else None,
    total=count + test.num_examples,
  )
  logging.info(
    'FID of %d samples against %d test images%s: %.3f',
    count,
    test.num_examples,
    ' (both Bernoulli-binarised)' if config.eval.fid_binarize else '',
    score,
  )
  return score


def _as_image_size(canvases: np.ndarray, image_size: int) -> np.ndarray:
  """Canvases enlarged (pixel repeat) to the image size, for side-by-side pictures."""
  factor = image_size // canvases.shape[1]
  return canvases.repeat(factor, axis=1).repeat(factor, axis=2)


def _interleave(columns: list[np.ndarray]) -> np.ndarray:
  """[a0, b0, c0, a1, b1, c1, ...] from equally long arrays a, b, c."""
  return np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])


def write_pictures(config, workdir, model: npdraw.NPDraw, variables, bank, test) -> None:
  """DIR/samples.png (canvas | decoded), DIR/drawing.gif (the first prior samples
  step by step) and DIR/reconstructions.png (input | canvas | output)."""
  run = api.Run(config, model, variables, bank)
  count, size = config.eval.num_pictures, model.image_size
  drawing = run.sample(
    count, config.seed, config.prior.sample_temperature, config.prior.sample_top_k or None
  )
  final = run.render(drawing)
  pairs = _interleave([_as_image_size(final, size), run.decode_canvases(final)])
  pictures.save_grid(os.path.join(workdir, SAMPLES_FILE), pairs, columns=8, scale=2)

  canvases, decoded = run.frames(drawing[:DRAWING_SAMPLES])
  frames = [
    _interleave([_as_image_size(canvases[:, t], size), decoded[:, t]])
    for t in range(canvases.shape[1])
  ]
  pictures.save_animation(os.path.join(workdir, DRAWING_FILE), frames, columns=8, scale=2)

  chosen = np.linspace(0, test.num_examples - 1, min(count, test.num_examples)).astype(int)
  images = input_pipeline.examples_at(test, chosen, config.data, config.seed)['image']
  # The most likely latents of q give the reconstruction's canvas.
  canvas = run.render(run.encode(images).drawing)
  triples = _interleave([images, _as_image_size(canvas, size), run.decode_canvases(canvas)])
  pictures.save_grid(os.path.join(workdir, RECONSTRUCTIONS_FILE), triples, columns=9, scale=2)
