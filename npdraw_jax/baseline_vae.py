"""A plain VAE, the baseline of the low-data study (spec section 9).

Gaussian latents z ~ N(0, I) of baseline.latent_dim dimensions; everything
else as NP-DRAW's stage 2: the encoder's CNN body, the decoder (fed a
canvas-shaped linear map of z), the pixel likelihood, the optimizer
(train_vae.make_optimizer), the batch size and the number of steps.

  train_and_evaluate(config, workdir)

trains with the ELBO (analytic KL), checkpoints in DIR/baseline/ and logs to
DIR/metrics.jsonl (stage 'baseline');

  run_eval(config, workdir)

computes per test image the importance-weighted bound at each S of
eval.iwae_samples and the single-sample bound, as the NP-DRAW eval stage does,
and logs their means and standard errors (stage 'baseline_eval').
"""

import dataclasses
import math
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from npdraw_jax import (
  checkpointing,
  distributions,
  evaluate,
  input_pipeline,
  losses,
  pipeline,
  sharding,
  train_lib,
  train_vae,
)
from npdraw_jax.models import gaussian_vae

STAGE = 'baseline'
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
  """The baseline with NP-DRAW's net sizes and likelihood from the configuration."""
  m, data = config.model, config.data
  if data.image_size % data.canvas_size:
    raise ValueError('data.image_size must be 1 or 2 times data.canvas_size.')
  latent_dim = config.baseline.latent_dim
  net = gaussian_vae.GaussianVAE(
    encoder=gaussian_vae.GaussianEncoder(latent_dim=latent_dim, features=m.encoder_features),
    decoder=gaussian_vae.LatentDecoder(
      canvas_size=data.canvas_size,
      channels=data.channels,
      features=m.decoder_features,
      out_channels=distributions.num_outputs(m.likelihood, data.channels, m.num_mixtures),
      upsample=data.image_size // data.canvas_size,
    ),
  )
  return BaselineVAE(
    net=net,
    likelihood=m.likelihood,
    num_mixtures=m.num_mixtures,
    image_size=data.image_size,
    channels=data.channels,
    latent_dim=latent_dim,
  )


def init_variables(model: BaselineVAE, key: jax.Array) -> dict:
  """Fresh {'params': {encoder, decoder}, 'batch_stats': {encoder, decoder}}."""
  images = jnp.zeros((1, model.image_size, model.image_size, model.channels))
  return model.net.init(key, images, train=False)


# --- Gaussian densities -------------------------------------------------------------


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """KL(N(mean, exp(log_var)) || N(0, I)) of diagonal Gaussians [B, D] -> [B] nats."""
  chex.assert_equal_shape([mean, log_var])
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """log N(z; 0, I) summed over the last axis."""
  return -0.5 * jnp.sum(jnp.square(z) + _LOG_2PI, axis=-1)


# --- Objective and bounds -------------------------------------------------------------


def _encode(model: BaselineVAE, variables: dict, images: jax.Array, train: bool):
  """(mean, log_var) of q(z | x), and the variables with updated statistics when training."""
  if not train:
    return model.net.apply(variables, images, train=False, method='encode'), variables
  out, updates = model.net.apply(
    variables, images, train=True, method='encode', mutable=['batch_stats']
  )
  return out, {**variables, **updates}


def _decode(model: BaselineVAE, variables: dict, z: jax.Array, train: bool):
  """Likelihood parameters of p(x | z), and the variables as _encode returns them."""
  if not train:
    return model.net.apply(variables, z, train=False, method='decode'), variables
  out, updates = model.net.apply(variables, z, train=True, method='decode', mutable=['batch_stats'])
  return out, {**variables, **updates}


def elbo_loss(model: BaselineVAE, variables: dict, images: jax.Array, key: jax.Array):
  """The negative ELBO, recon + analytic KL, averaged over the batch.

  Args:
    model: the nets.
    variables: {'params': ..., 'batch_stats': ...}.
    images: [B, H, W, C] in [0, 1].
    key: PRNG key of the reparameterised sample.

  Returns:
    (loss, (metrics, new batch_stats)).
  """
  chex.assert_rank(images, 4)
  (mean, log_var), variables = _encode(model, variables, images, train=True)
  z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
  out, variables = _decode(model, variables, z, train=True)
  recon = distributions.nll(model.likelihood, out, images, model.num_mixtures)
  kl = gaussian_kl(mean, log_var)
  loss = jnp.mean(recon + kl)
  metrics = {'loss': loss, 'recon': jnp.mean(recon), 'kl': jnp.mean(kl)}
  return loss, (metrics, variables['batch_stats'])


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
  out, _ = _decode(model, variables, z.reshape(-1, model.latent_dim), train=False)
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
  """Per-image bounds on -log p(x) in nats at each S (losses.importance_weighted_bounds)."""
  (mean, log_var), _ = _encode(model, variables, images, train=False)
  return losses.importance_weighted_bounds(
    lambda k, n: log_importance_weights(model, variables, images, mean, log_var, k, n),
    key,
    sample_counts,
    chunk_size,
  )


# --- Training -----------------------------------------------------------------------


def checkpoint_settings(config: ml_collections.ConfigDict) -> dict:
  """What a baseline checkpoint must agree with: its data (subset included) and shapes."""
  m = config.model
  return {
    'data': pipeline.bank_settings(config)['data'],
    'latent_dim': config.baseline.latent_dim,
    'model': {
      k: m[k] for k in ('likelihood', 'num_mixtures', 'encoder_features', 'decoder_features')
    },
  }


def open_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> checkpointing.Checkpoints:
  """The baseline's checkpoints in DIR/baseline (stage 2's checkpoint intervals)."""
  return checkpointing.Checkpoints(
    os.path.join(workdir, STAGE),
    checkpoint_settings(config),
    keep=config.vae.keep_checkpoints,
    every=config.vae.checkpoint_every,
    config=config,
  )


def make_init_fn(config: ml_collections.ConfigDict, model: BaselineVAE):
  """A function creating the fresh baseline state (seeded by config.seed)."""
  # A key stream of its own (the NP-DRAW stages fold in 1 to 4).
  init_key, loop_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 5))
  tx = train_vae.make_optimizer(config)

  def init_fn():
    return train_vae.create_state(init_variables(model, init_key), tx, loop_key)

  return init_fn


def make_train_step(model: BaselineVAE, mesh):
  """The jitted step (state, batch) -> (state, metrics)."""

  def train_step(state, batch):
    key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      return elbo_loss(model, variables, batch['image'], key)

    return train_vae.gradient_step(state, loss_fn)

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
    train_step,
    in_shardings=(replicated, batched),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_vae.TrainState:
  """Trains (or finishes training) the baseline for stage 2's steps; returns the state."""
  local_batch = sharding.check_batch_size(config.vae.batch_size, 'vae.batch_size')
  mesh = sharding.make_mesh()
  train = input_pipeline.load_split(config.data, 'train', jax.process_index(), jax.process_count())
  num_train = train.num_examples * jax.process_count()
  num_steps = train_vae.num_train_steps(config, num_train)
  model = make_model(config)
  checkpoints = open_checkpoints(config, workdir)
  state = train_lib.restore_or_init(checkpoints, make_init_fn(config, model), mesh)
  train_step = make_train_step(model, mesh)

  def batch_at(step):
    batch = input_pipeline.train_batch(train, config.data, local_batch, config.seed, step)
    return sharding.to_global({'image': batch['image']}, mesh)

  metrics_log = train_lib.MetricsLog(workdir, STAGE)
  state = train_lib.train_loop(
    stage=STAGE,
    state=state,
    train_step=train_step,
    batch_at=batch_at,
    num_steps=num_steps,
    checkpoints=checkpoints,
    metrics_log=metrics_log,
    log_every=config.vae.log_every,
    eval_every=0,
    description=f'{config.vae.batch_size} images per step, {num_train:,} training images',
    evaluate=None,
  )
  checkpoints.close()
  metrics_log.close()
  return state


# --- Evaluation ---------------------------------------------------------------------


def restore_trained(config: ml_collections.ConfigDict, workdir: str, model: BaselineVAE, mesh):
  """The finished baseline's state; a clear error when it is not trained."""
  num_train = input_pipeline.load_split(config.data, 'train').num_examples
  wanted = train_vae.num_train_steps(config, num_train)
  checkpoints = open_checkpoints(config, workdir)
  if (checkpoints.latest_step() or 0) < wanted:
    raise FileNotFoundError(
      f'Evaluating the baseline needs it trained to step {wanted} in {checkpoints.directory} '
      f'(found: {checkpoints.latest_step()}): run baseline_vae.train_and_evaluate first.'
    )
  state = train_lib.restore_or_init(checkpoints, make_init_fn(config, model), mesh)
  checkpoints.close()
  return state


def make_eval_step(model: BaselineVAE, config: ml_collections.ConfigDict, mesh):
  """Jitted (variables, batch, key) -> per-image bounds and 'mask' [B], replicated."""
  counts = evaluate.iwae_sample_counts(config)
  chunk = min(config.eval.chunk_size, counts[-1])

  def eval_step(variables, batch, key):
    bounds = iwae_bounds(model, variables, batch['image'], key, counts, chunk)
    return {**bounds, 'mask': batch['mask']}

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
    eval_step, in_shardings=(replicated, batched, replicated), out_shardings=replicated
  )


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Bounds of the trained baseline on the whole test split; returns the summary.

  The summary is evaluate.summarise's: 'nll_iwae' (largest S), 'elbo', one
  'nll_iwae_{S}' per S, each with its '_stderr', and 'iwae_samples'.
  """
  mesh = sharding.make_mesh()
  model = make_model(config)
  state = restore_trained(config, workdir, model, mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  test = input_pipeline.load_split(config.data, 'test', jax.process_index(), jax.process_count())
  eval_step = make_eval_step(model, config, mesh)
  summary = evaluate.test_bounds(
    config,
    test,
    mesh,
    lambda batch, key: eval_step(variables, batch, key),
    is_8bit=model.likelihood != 'bernoulli',
  )
  logging.info('Stage %s on %d test images: %s', EVAL_STAGE, summary['test_images'], summary)
  metrics_log = train_lib.MetricsLog(workdir, EVAL_STAGE)
  metrics_log.write(int(state.step), 'test', summary)
  metrics_log.close()
  return summary
