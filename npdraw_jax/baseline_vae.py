"""A plain VAE, the baseline of the low-data study (docs/model.md, section 9).

The flax examples' MNIST VAE: Gaussian latents z ~ N(0, I) of
baseline.latent_dim dimensions, an encoder and a decoder of one hidden layer
of baseline.hidden ReLU units each, the project's pixel likelihood
(model.likelihood: Bernoulli for binarised digits), and its own optimizer:
Adam at baseline.lr on batches of baseline.batch_size for baseline.train_steps.

  train_and_evaluate(config, workdir)

trains with the ELBO (analytic KL), checkpoints in DIR/baseline/ and logs to
DIR/metrics.jsonl (stage 'baseline'). With data.holdout_size > 0 it bounds
the NLL of the held-out training images every baseline.checkpoint_every steps
(split 'holdout', vae.holdout_iwae_samples samples, as stage 2 does),
keeps the best checkpoint in DIR/baseline/best and, with baseline.patience > 0,
stops early when that bound has not improved for baseline.patience steps;

  run_eval(config, workdir)

computes per test image, for the best checkpoint when there is one (else the
last), the importance-weighted bound at each S of eval.iwae_samples and the
single-sample bound, as the NP-DRAW eval stage does, and logs their means and
standard errors with the steps trained and the evaluated step (stage
'baseline_eval').
"""

import dataclasses
import math
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from npdraw_jax.infra import checkpointing, input_pipeline, sharding, training
from npdraw_jax.model import bound, distributions
from npdraw_jax.model.nets import gaussian_vae
from npdraw_jax.stages import bank_parse, scoring, train_vae

STAGE = 'baseline'  # Also its checkpoint folder, DIR/baseline.
EVAL_STAGE = 'baseline_eval'
_LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class BaselineVAE:
  """The nets and static settings of the baseline."""

  net: gaussian_vae.GaussianVAE
  likelihood: str
  num_mixtures: int
  image_size: int
  channels: int
  latent_dim: int


def make_model(config: ml_collections.ConfigDict) -> BaselineVAE:
  """The baseline with its sizes (baseline.*) and the configured likelihood."""
  m, data, b = config.model, config.data, config.baseline
  net = gaussian_vae.GaussianVAE(
    encoder=gaussian_vae.MlpEncoder(hidden=b.hidden, latent_dim=b.latent_dim),
    decoder=gaussian_vae.MlpDecoder(
      hidden=b.hidden,
      height=data.image_size,
      width=data.image_size,
      out_channels=distributions.num_outputs(m.likelihood, data.channels, m.num_mixtures),
    ),
  )
  return BaselineVAE(
    net=net,
    likelihood=m.likelihood,
    num_mixtures=m.num_mixtures,
    image_size=data.image_size,
    channels=data.channels,
    latent_dim=b.latent_dim,
  )


def init_variables(model: BaselineVAE, key: jax.Array) -> dict:
  """Fresh {'params': {'encoder', 'decoder'}}."""
  images = jnp.zeros((1, model.image_size, model.image_size, model.channels))
  return model.net.init(key, images)


# --- Gaussian densities -------------------------------------------------------------


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """KL(N(mean, exp(log_var)) || N(0, I)) of diagonal Gaussians [B, D] -> [B] nats."""
  chex.assert_equal_shape([mean, log_var])
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """log N(z; 0, I) summed over the last axis."""
  return -0.5 * jnp.sum(jnp.square(z) + _LOG_2PI, axis=-1)


# --- Objective and bounds -------------------------------------------------------------


def elbo_loss(model: BaselineVAE, params: dict, images: jax.Array, key: jax.Array):
  """The negative ELBO, recon + analytic KL, averaged over the batch.

  Args:
    model: the nets.
    params: {'encoder': ..., 'decoder': ...}.
    images: [B, H, W, C] in [0, 1].
    key: PRNG key of the reparameterised sample.

  Returns:
    (loss, metrics).
  """
  chex.assert_rank(images, 4)
  variables = {'params': params}
  mean, log_var = model.net.apply(variables, images, method='encode')
  z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
  out = model.net.apply(variables, z, method='decode')
  recon = distributions.nll(model.likelihood, out, images, model.num_mixtures)
  kl = gaussian_kl(mean, log_var)
  loss = jnp.mean(recon + kl)
  return loss, {'loss': loss, 'recon': jnp.mean(recon), 'kl': jnp.mean(kl)}


def log_importance_weights(
  model: BaselineVAE,
  variables: dict,
  images: jax.Array,
  mean: jax.Array,
  log_var: jax.Array,
  key: jax.Array,
  num_samples: int,
) -> jax.Array:
  """log p(x | z_s) + log p(z_s) - log q(z_s | x) for S samples of q, [S, B]."""
  batch = images.shape[0]
  chex.assert_shape([mean, log_var], (batch, model.latent_dim))
  eps = jax.random.normal(key, (num_samples, *mean.shape))
  z = mean + jnp.exp(0.5 * log_var) * eps
  # log q from the standardised draw: exact, however small the variance.
  log_q = standard_normal_log_prob(eps) - 0.5 * jnp.sum(log_var, axis=-1)
  out = model.net.apply(variables, z.reshape(-1, model.latent_dim), method='decode')
  repeated = jnp.broadcast_to(images, (num_samples, *images.shape)).reshape(-1, *images.shape[1:])
  log_px = -distributions.nll(model.likelihood, out, repeated, model.num_mixtures)
  return log_px.reshape(num_samples, batch) + standard_normal_log_prob(z) - log_q


def iwae_bounds(
  model: BaselineVAE,
  variables: dict,
  images: jax.Array,
  key: jax.Array,
  sample_counts: tuple[int, ...],
  chunk_size: int,
) -> dict[str, jax.Array]:
  """Per-image bounds on -log p(x) in nats at each S (bound.importance_weighted_bounds)."""
  mean, log_var = model.net.apply(variables, images, method='encode')
  return bound.importance_weighted_bounds(
    lambda k, n: log_importance_weights(model, variables, images, mean, log_var, k, n),
    key,
    sample_counts,
    chunk_size,
  )


# --- Training -----------------------------------------------------------------------


def checkpoint_settings(config: ml_collections.ConfigDict) -> dict:
  """What a baseline checkpoint must agree with: its data (subset included) and shapes."""
  return {
    'data': bank_parse.bank_settings(config)['data'],
    'hidden': config.baseline.hidden,
    'latent_dim': config.baseline.latent_dim,
    'likelihood': config.model.likelihood,
    'num_mixtures': config.model.num_mixtures,
  }


def open_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> checkpointing.Checkpoints:
  """The baseline's checkpoints in DIR/baseline."""
  return checkpointing.Checkpoints(
    os.path.join(workdir, STAGE),
    checkpoint_settings(config),
    keep=config.baseline.keep_checkpoints,
    every=config.baseline.checkpoint_every,
    config=config,
  )


def open_best_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, read_only: bool = False
) -> checkpointing.BestCheckpoint | None:
  """DIR/baseline/best, the checkpoint with the lowest held-out bound so far;
  None when no images are held out (data.holdout_size = 0)."""
  if config.data.holdout_size == 0:
    return None
  return checkpointing.BestCheckpoint(
    os.path.join(workdir, STAGE), train_vae.HOLDOUT_METRIC, read_only
  )


def make_init_fn(config: ml_collections.ConfigDict, model: BaselineVAE):
  """A function creating the fresh baseline state (seeded by config.seed)."""
  # A key stream of its own (the NP-DRAW stages fold in 1 to 4).
  init_key, loop_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 5))
  tx = optax.adam(config.baseline.lr)

  def init_fn():
    params = init_variables(model, init_key)['params']
    return training.TrainState.create(apply_fn=None, params=params, tx=tx, rng=loop_key)

  return init_fn


def make_train_step(model: BaselineVAE, mesh):
  """The jitted step (state, batch) -> (state, metrics)."""

  def train_step(state, batch):
    key = jax.random.fold_in(state.rng, state.step)
    grads, metrics = jax.grad(
      lambda params: elbo_loss(model, params, batch['image'], key), has_aux=True
    )(state.params)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), metrics

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
    train_step,
    in_shardings=(replicated, batched),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )


def make_holdout_evaluation(
  config: ml_collections.ConfigDict, model: BaselineVAE, mesh, best: checkpointing.BestCheckpoint
):
  """The baseline's held-out check (train_vae.make_holdout_check): the
  importance-weighted bound with vae.holdout_iwae_samples samples, as stage 2's."""
  num_samples = config.vae.holdout_iwae_samples
  chunk = bound.sample_chunk(num_samples, config.eval.chunk_size, 'vae.holdout_iwae_samples')
  eval_step = make_eval_step(model, mesh, (num_samples,), chunk)
  bounds_fn = lambda state, batch, key: eval_step({'params': state.params}, batch, key)
  is_8bit = model.likelihood != 'bernoulli'
  return train_vae.make_holdout_check(config, mesh, best, bounds_fn, num_samples, is_8bit, STAGE)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> training.TrainState:
  """Trains (or finishes training) the baseline for baseline.train_steps, or
  until it stops early (baseline.patience); returns the state."""
  b = config.baseline
  local_batch = sharding.check_batch_size(b.batch_size, 'baseline.batch_size')
  mesh = sharding.make_mesh()
  train = input_pipeline.load_split(config.data, 'train', jax.process_index(), jax.process_count())
  num_train = train.num_examples * jax.process_count()
  model = make_model(config)
  checkpoints = open_checkpoints(config, workdir)
  state = training.restore_or_init(checkpoints, make_init_fn(config, model), mesh)
  train_step = make_train_step(model, mesh)

  def batch_at(step):
    batch = input_pipeline.train_batch(train, config.data, local_batch, config.seed, step)
    return sharding.to_global({'image': batch['image']}, mesh)

  best = open_best_checkpoint(config, workdir)
  metrics_log = training.MetricsLog(workdir, STAGE)
  state = training.train_loop(
    stage=STAGE,
    state=state,
    train_step=train_step,
    batch_at=batch_at,
    num_steps=b.train_steps,
    checkpoints=checkpoints,
    metrics_log=metrics_log,
    log_every=b.log_every,
    eval_every=b.checkpoint_every if best else 0,
    description=f'{b.batch_size} images per step, {num_train:,} training images',
    evaluate=make_holdout_evaluation(config, model, mesh, best) if best else None,
    eval_split='holdout',
    early_stop=training.held_out_stop(best, b.patience, b.checkpoint_every) if best else None,
  )
  if best:
    best.close()
  checkpoints.close()
  metrics_log.close()
  return state


# --- Evaluation ---------------------------------------------------------------------


def restore_trained(
  config: ml_collections.ConfigDict, workdir: str, model: BaselineVAE, mesh
) -> tuple[training.TrainState, int]:
  """(state, steps trained) of the finished baseline (trained to
  baseline.train_steps or stopped early): the state of the best held-out
  checkpoint when there is one, else of the last; a clear error when it is not
  trained."""
  b = config.baseline
  checkpoints = open_checkpoints(config, workdir)
  best = open_best_checkpoint(config, workdir, read_only=True)
  latest, best_step = checkpoints.latest_step(), training.best_step(best)
  try:
    if not training.is_finished(
      latest or 0, b.train_steps, best_step, b.patience, b.checkpoint_every
    ):
      raise FileNotFoundError(
        f'Evaluating the baseline needs it trained to step {b.train_steps} (or stopped early) '
        f'in {checkpoints.directory} (found: {latest}): run baseline_vae.train_and_evaluate '
        'first.'
      )
    init_fn = make_init_fn(config, model)
    if best_step is None:
      logging.info('Using the last baseline checkpoint, step %s.', latest)
      return training.restore_or_init(checkpoints, init_fn, mesh), latest or 0
    logging.info(
      'Using the baseline checkpoint with the best held-out bound: step %d (the last is %d).',
      best_step,
      latest,
    )
    return best.restore(training.abstract_state(init_fn, mesh)), latest
  finally:
    if best:
      best.close()
    checkpoints.close()


def make_eval_step(model: BaselineVAE, mesh, sample_counts: tuple[int, ...], chunk_size: int):
  """Jitted (variables, batch, key) -> per-image bounds at sample_counts (chunk_size
  samples per pass) and 'mask' [B], replicated."""

  def eval_step(variables, batch, key):
    bounds = iwae_bounds(model, variables, batch['image'], key, sample_counts, chunk_size)
    return {**bounds, 'mask': batch['mask']}

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
    eval_step, in_shardings=(replicated, batched, replicated), out_shardings=replicated
  )


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Bounds of the trained baseline on the whole test split; returns the summary.

  The summary is bound.summarise's: 'nll_iwae' (largest S), 'elbo', one
  'nll_iwae_{S}' per S, each with its '_stderr', and 'iwae_samples'; and
  'trained_steps' (the last checkpoint's step) and 'evaluated_step' (the best
  held-out checkpoint's when there is one, else the last's).
  """
  mesh = sharding.make_mesh()
  model = make_model(config)
  state, trained_steps = restore_trained(config, workdir, model, mesh)
  variables = {'params': state.params}
  test = input_pipeline.load_split(config.data, 'test', jax.process_index(), jax.process_count())
  counts = bound.iwae_sample_counts(config)
  eval_step = make_eval_step(model, mesh, counts, min(config.eval.chunk_size, counts[-1]))
  summary = scoring.test_bounds(
    config,
    test,
    mesh,
    lambda batch, key: eval_step(variables, batch, key),
    is_8bit=model.likelihood != 'bernoulli',
  )
  summary.update(trained_steps=trained_steps, evaluated_step=int(state.step))
  logging.info('Stage %s on %d test images: %s', EVAL_STAGE, summary['test_images'], summary)
  metrics_log = training.MetricsLog(workdir, EVAL_STAGE)
  metrics_log.write(int(state.step), 'test', summary)
  metrics_log.close()
  return summary
