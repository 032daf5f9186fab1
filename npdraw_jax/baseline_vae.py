"""A plain VAE, the baseline of the low-data study (docs/model.md, section 9).

The flax examples' MNIST VAE: Gaussian latents z ~ N(0, I) of
baseline.latent_dim dimensions, an encoder and a decoder of one hidden layer
of baseline.hidden ReLU units each, the project's pixel likelihood
(model.likelihood: Bernoulli for binarised digits), and its own optimizer:
Adam at baseline.lr on batches of baseline.batch_size for baseline.train_steps.

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
import optax
from absl import logging

from npdraw_jax.infra import checkpointing, input_pipeline, sharding, training
from npdraw_jax.model import bound, distributions
from npdraw_jax.model.nets import gaussian_vae
from npdraw_jax.stages import bank_parse, scoring

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> training.TrainState:
  """Trains (or finishes training) the baseline for baseline.train_steps; returns the state."""
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
    eval_every=0,
    description=f'{b.batch_size} images per step, {num_train:,} training images',
    evaluate=None,
  )
  checkpoints.close()
  metrics_log.close()
  return state


# --- Evaluation ---------------------------------------------------------------------


def restore_trained(config: ml_collections.ConfigDict, workdir: str, model: BaselineVAE, mesh):
  """The finished baseline's state; a clear error when it is not trained."""
  wanted = config.baseline.train_steps
  checkpoints = open_checkpoints(config, workdir)
  if (checkpoints.latest_step() or 0) < wanted:
    raise FileNotFoundError(
      f'Evaluating the baseline needs it trained to step {wanted} in {checkpoints.directory} '
      f'(found: {checkpoints.latest_step()}): run baseline_vae.train_and_evaluate first.'
    )
  state = training.restore_or_init(checkpoints, make_init_fn(config, model), mesh)
  checkpoints.close()
  return state


def make_eval_step(model: BaselineVAE, config: ml_collections.ConfigDict, mesh):
  """Jitted (variables, batch, key) -> per-image bounds and 'mask' [B], replicated."""
  counts = bound.iwae_sample_counts(config)
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

  The summary is bound.summarise's: 'nll_iwae' (largest S), 'elbo', one
  'nll_iwae_{S}' per S, each with its '_stderr', and 'iwae_samples'.
  """
  mesh = sharding.make_mesh()
  model = make_model(config)
  state = restore_trained(config, workdir, model, mesh)
  variables = {'params': state.params}
  test = input_pipeline.load_split(config.data, 'test', jax.process_index(), jax.process_count())
  eval_step = make_eval_step(model, config, mesh)
  summary = scoring.test_bounds(
    config,
    test,
    mesh,
    lambda batch, key: eval_step(variables, batch, key),
    is_8bit=model.likelihood != 'bernoulli',
  )
  logging.info('Stage %s on %d test images: %s', EVAL_STAGE, summary['test_images'], summary)
  metrics_log = training.MetricsLog(workdir, EVAL_STAGE)
  metrics_log.write(int(state.step), 'test', summary)
  metrics_log.close()
  return summary
