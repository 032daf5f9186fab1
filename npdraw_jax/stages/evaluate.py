"""The eval stage: importance-weighted NLL on the test split, and pictures.

  run(config, workdir)

restores the trained model (the checkpoint with the best held-out bound when
data.holdout_size > 0, else the last), computes per test image the
importance-weighted bound at each S of eval.iwae_samples (hard samples, docs/model.md
section 8), the single-sample bound and the authors' estimate
nll_authors_{eval.authors_samples} (not a bound, section 11), and, when
eval.fid_weights names an Inception file, the FID of prior samples against the
test split; writes the means and standard errors to DIR/metrics.jsonl (stage
'eval', split 'test'), and draws DIR/samples.png, DIR/reconstructions.png and
DIR/drawing.gif; DIR/eval.json records the evaluated checkpoint, the eval
settings and the summary, so that a rerun of the same eval is skipped. It
reads the earlier stages' outputs only. The bound is computed in
npdraw_jax/model/bound.py, as for stage 2's held-out check.
"""

import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import (
  artifacts,
  checkpointing,
  input_pipeline,
  interrupt,
  pictures,
  run_dir,
  sharding,
  training,
)
from npdraw_jax.model import bound, distributions, npdraw, sampling, trained
from npdraw_jax.stages import fid, scoring, train_vae

STAGE = 'eval'
DRAWING_SAMPLES = 8  # Prior samples animated in drawing.gif.
EVAL_PICTURES = (
  run_dir.SAMPLES_PICTURE,
  run_dir.RECONSTRUCTIONS_PICTURE,
  run_dir.DRAWING_ANIMATION,
)


def eval_record_key(config: ml_collections.ConfigDict, workdir: str, chosen: dict) -> dict:
  """What an eval's results depend on: the evaluated checkpoint (`chosen`, as
  train_vae.FinishedVAE.chosen gives it, with its stage's settings record) and
  the eval's own settings."""
  checkpoint = dict(chosen)
  checkpoint['record'] = checkpointing.read_record(os.path.join(workdir, run_dir.VAE_DIR))
  settings = checkpointing.config_fields(
    config, ('seed', 'eval', 'prior.sample_temperature', 'prior.sample_top_k')
  )
  return {'checkpoint': checkpoint, 'settings': settings}


def _recorded_summary(workdir: str, key: dict) -> dict[str, float] | None:
  """The summary in DIR/eval.json when it records an eval under `key` and its
  pictures are there, else None."""
  path = os.path.join(workdir, run_dir.EVAL_RECORD_FILE)
  if not os.path.exists(path):
    return None
  try:
    record = run_dir.read_json(path)
  except errors.RecordError as e:  # Only a cache of the summary: recompute it.
    logging.warning('%s; evaluating again.', e)
    return None
  pictures_there = all(os.path.exists(os.path.join(workdir, name)) for name in EVAL_PICTURES)
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
  with train_vae.FinishedVAE(config, workdir, allow_changed_settings) as finished:
    key = eval_record_key(config, workdir, finished.chosen)
    recorded = _recorded_summary(workdir, key)
    if recorded is None:
      return _evaluate(config, workdir, key, finished)
  logging.info(
    'Stage %s: the %s VAE checkpoint (step %d) is already evaluated under these settings '
    '(%s); skipping. Its summary: %s',
    STAGE,
    key['checkpoint']['which'],
    key['checkpoint']['step'],
    os.path.join(workdir, run_dir.EVAL_RECORD_FILE),
    recorded,
  )
  return recorded


def _evaluate(
  config: ml_collections.ConfigDict, workdir: str, key: dict, finished: train_vae.FinishedVAE
) -> dict[str, float]:
  """The eval proper: bounds, FID, metrics line, pictures, then the record."""
  # A bad weights file fails here, not after hours of importance sampling.
  inception = fid.load_inception(config.eval.fid_weights) if config.eval.fid_weights else None
  mesh = sharding.make_mesh()
  model, state = finished.restore(mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  bank = sharding.replicate(jnp.asarray(run_dir.load_bank(workdir).parts), mesh)
  # Every process holds the whole test split and serves its part of each batch.
  test = input_pipeline.load_split(config.data, 'test')
  eval_step = scoring.make_eval_step(
    model,
    mesh,
    bound.iwae_sample_counts(config),
    config.eval.chunk_size,
    config.eval.authors_samples,
  )
  summary = scoring.test_bounds(
    config,
    test,
    mesh,
    lambda batch, key: eval_step(variables, bank, batch, key),
    is_8bit=model.likelihood != 'bernoulli',
    description=f'Stage {STAGE} (S = {", ".join(map(str, bound.iwae_sample_counts(config)))})',
    stoppable=True,
  )
  summary.update(trained_steps=key['checkpoint']['trained_steps'], evaluated_step=int(state.step))
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
  interrupt.stop_if_requested(f'Stage {STAGE}: interrupted, nothing recorded')
  metrics_log = training.MetricsLog(workdir, STAGE)
  metrics_log.write(int(state.step), 'test', summary)
  metrics_log.drop_repeats()  # An eval of this checkpoint under other settings.
  metrics_log.close()
  if jax.process_index() == 0:
    write_pictures(
      config, workdir, model, sharding.local_copy(variables), sharding.local_copy(bank), test
    )
    # Last: a record means that the metrics and pictures are written.
    record_path = os.path.join(workdir, run_dir.EVAL_RECORD_FILE)
    artifacts.save_json(record_path, {**key, 'summary': summary})
  return summary


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
    interrupt.stop_if_requested(f'Stage {STAGE}: interrupted during FID, nothing recorded')
    samples = sampler(
      variables['params']['prior'],
      bank,
      jax.random.fold_in(key, b),
      config.prior.sample_temperature,
    )
    yield np.asarray(decode(samples.canvases[:, -1]))[: count - start]


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
  score = fid.images_fid(
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
  run = trained.TrainedModel(config, model, variables, bank)
  count, size = config.eval.num_pictures, model.image_size
  drawing = run.sample(
    count, config.seed, config.prior.sample_temperature, config.prior.sample_top_k or None
  )
  final = run.render(drawing)
  pairs = _interleave([_as_image_size(final, size), run.decode_canvases(final)])
  pictures.save_grid(os.path.join(workdir, run_dir.SAMPLES_PICTURE), pairs, columns=8, scale=2)

  canvases, decoded = run.frames(drawing[:DRAWING_SAMPLES])
  frames = [
    _interleave([_as_image_size(canvases[:, t], size), decoded[:, t]])
    for t in range(canvases.shape[1])
  ]
  pictures.save_animation(
    os.path.join(workdir, run_dir.DRAWING_ANIMATION), frames, columns=8, scale=2
  )

  chosen = np.linspace(0, test.num_examples - 1, min(count, test.num_examples)).astype(int)
  images = input_pipeline.examples_at(test, chosen, config.data, config.seed)['image']
  # The most likely latents of q give the reconstruction's canvas.
  canvas = run.render(run.encode(images).drawing)
  triples = _interleave([images, _as_image_size(canvas, size), run.decode_canvases(canvas)])
  pictures.save_grid(
    os.path.join(workdir, run_dir.RECONSTRUCTIONS_PICTURE), triples, columns=9, scale=2
  )
