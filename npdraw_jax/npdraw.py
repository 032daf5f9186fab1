"""NP-DRAW put together: encoder -> latents -> canvas -> decoder, and the prior.

`make_model(config)` builds the modules once; the functions below are pure
and take parameters explicitly. Parameters live in one dict
{'encoder', 'decoder', 'prior'}; batch statistics in {'encoder', 'decoder'}.
"""

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections

from npdraw_jax import canvas as canvas_lib
from npdraw_jax import distributions, gumbel, losses, pipeline
from npdraw_jax.models import decoder as decoder_lib
from npdraw_jax.models import encoder as encoder_lib
from npdraw_jax.models import layers
from npdraw_jax.models import prior as prior_lib


@dataclasses.dataclass(frozen=True)
class NPDraw:
  """The modules and static settings of one model."""

  encoder: encoder_lib.Encoder
  decoder: decoder_lib.Decoder
  prior: prior_lib.Prior
  grid: canvas_lib.Grid
  likelihood: str
  num_mixtures: int
  image_size: int
  channels: int


def make_model(config: ml_collections.ConfigDict) -> NPDraw:
  """The model a configuration describes."""
  grid = pipeline.grid_from_config(config)
  m, data = config.model, config.data
  dtype = layers.compute_dtype(m.compute_dtype)
  if data.image_size % data.canvas_size:
    raise ValueError('data.image_size must be 1 or 2 times data.canvas_size.')
  return NPDraw(
    encoder=encoder_lib.Encoder(
      num_steps=m.T,
      num_locations=grid.num_locations,
      num_parts=m.K,
      features=m.encoder_features,
      head=m.encoder_head,
      dtype=dtype,
    ),
    decoder=decoder_lib.Decoder(
      features=m.decoder_features,
      out_channels=distributions.num_outputs(m.likelihood, data.channels, m.num_mixtures),
      upsample=data.image_size // data.canvas_size,
      dtype=dtype,
    ),
    prior=prior_lib.make_prior(config, grid.num_locations),
    grid=grid,
    likelihood=m.likelihood,
    num_mixtures=m.num_mixtures,
    image_size=data.image_size,
    channels=data.channels,
  )


def init_variables(model: NPDraw, key: jax.Array, prior_params=None) -> dict:
  """Fresh {'params': {encoder, decoder, prior}, 'batch_stats': {encoder, decoder}}.

  prior_params, when given (the trained prior), are used instead of a fresh init.
  """
  k_enc, k_dec, k_prior = jax.random.split(key, 3)
  side, c = model.image_size, model.channels
  canvas = jnp.zeros((1, model.grid.canvas_size, model.grid.canvas_size, c))
  enc = model.encoder.init(k_enc, jnp.zeros((1, side, side, c)), train=False)
  dec = model.decoder.init(k_dec, canvas, train=False)
  if prior_params is None:
    history = jnp.zeros((1, model.prior.num_steps, *canvas.shape[1:]))
    prior_params = model.prior.init(
      k_prior, history, history[..., :1], jnp.arange(model.prior.num_steps)
    )['params']
  return {
    'params': {'encoder': enc['params'], 'decoder': dec['params'], 'prior': prior_params},
    'batch_stats': {'encoder': enc['batch_stats'], 'decoder': dec['batch_stats']},
  }


# --- Schedules (functions of the epoch, so they can run inside jit) ---------


def gumbel_temperature(epoch, tau0: float, tau_min: float, rate: float):
  """tau(e) = max(tau_min, tau0 * exp(-rate * e)) (spec section 5)."""
  return jnp.maximum(tau_min, tau0 * jnp.exp(-rate * epoch))


def teacher_forcing_rate(epoch, decay: float):
  """rho(e) = exp(-decay * e): rho starts at 1, multiplied by exp(-decay) per epoch."""
  return jnp.exp(-decay * epoch)


# --- Latents ------------------------------------------------------------------


class Latents(NamedTuple):
  """Per-step latents as weights: pres [B, T] in [0, 1], where [B, T, L], what [B, T, K]."""

  pres: jax.Array
  where: jax.Array
  what: jax.Array


def _apply_net(module, name: str, variables: dict, x: jax.Array, train: bool):
  """Runs the encoder or decoder (`name`) with its batch statistics.

  Returns its output and the batch statistics to keep (updated when training).
  """
  net_vars = {'params': variables['params'][name], 'batch_stats': variables['batch_stats'][name]}
  if not train:
    return module.apply(net_vars, x, train=False), net_vars['batch_stats']
  out, updates = module.apply(net_vars, x, train=True, mutable=['batch_stats'])
  return out, updates['batch_stats']


def encode(model: NPDraw, variables: dict, images: jax.Array, train: bool):
  """q's logits {'pres', 'where', 'what'} and the encoder's batch statistics."""
  return _apply_net(model.encoder, 'encoder', variables, images, train)


def decode(model: NPDraw, variables: dict, canvas: jax.Array, train: bool):
  """Likelihood parameters for canvases [B, Hc, Wc, C], and the decoder's batch statistics."""
  return _apply_net(model.decoder, 'decoder', variables, canvas, train)


def relaxed_latents(
  key: jax.Array, q: dict, tau, what_straight_through: bool, pres_relaxed: bool
) -> Latents:
  """Training samples: Gumbel-softmax what, straight-through where, hard (or relaxed) pres."""
  k_what, k_where, k_pres = jax.random.split(key, 3)
  pres = (
    gumbel.relaxed_bernoulli(k_pres, q['pres'], tau)
    if pres_relaxed
    else gumbel.bernoulli(k_pres, q['pres'])
  )
  return Latents(
    pres=pres,
    where=gumbel.gumbel_softmax(k_where, q['where'], tau, straight_through=True),
    what=gumbel.gumbel_softmax(k_what, q['what'], tau, straight_through=what_straight_through),
  )


def one_hot_latents(pres, where, what, num_locations: int, num_parts: int) -> Latents:
  """Integer step sequences [B, T] (e.g. a parse) as one-hot latents."""
  return Latents(
    pres=pres.astype(jnp.float32),
    where=jax.nn.one_hot(where, num_locations),
    what=jax.nn.one_hot(what, num_parts),
  )


def prior_kl(q: dict, p: dict, pres: jax.Array) -> jax.Array:
  """sum_t KL(q_pres || p_pres) + pres_t (KL(q_where || p_where) + KL(q_what || p_what)), [B]."""
  per_step = distributions.bernoulli_kl(q['pres'], p['pres']) + pres * (
    distributions.categorical_kl(q['where'], p['where'])
    + distributions.categorical_kl(q['what'], p['what'])
  )
  return jnp.sum(per_step, axis=-1)


def parse_supervision(q: dict, parse_pres, parse_where, parse_what) -> jax.Array:
  """Cross-entropy of q against the parse: BCE on pres, CE on where/what where drawn, [B]."""
  drawn = parse_pres.astype(jnp.float32)
  per_step = -distributions.bernoulli_log_prob(q['pres'], drawn) - drawn * (
    distributions.categorical_log_prob(q['where'], parse_where)
    + distributions.categorical_log_prob(q['what'], parse_what)
  )
  return jnp.sum(per_step, axis=-1)


# --- Stage-2 objective ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Static settings of the stage-2 loss."""

  beta: float
  lambda_sup: float
  what_straight_through: bool
  pres_relaxed: bool
  finetune_prior: bool = False


def stage2_loss(
  model: NPDraw,
  variables: dict,
  bank: jax.Array,
  batch: dict,
  key: jax.Array,
  tau,
  rho,
  weights: LossWeights,
):
  """loss = recon + beta * KL + lambda_sup * SUP, averaged over the batch (spec section 7).

  Args:
    model: the modules.
    variables: {'params': {...}, 'batch_stats': {...}}.
    bank: [K, p, p, C] parts.
    batch: 'image' [B, H, W, C] and the example's parse 'pres', 'where', 'what' [B, T].
    key: PRNG key of this step.
    tau: Gumbel temperature.
    rho: probability that an example's decoder input is its parse.
    weights: beta, lambda_sup and the latent relaxations.

  Returns:
    (loss, (metrics, new batch_stats)).
  """
  images = batch['image']
  batch_size, grid = images.shape[0], model.grid
  chex.assert_shape(batch['pres'], (batch_size, model.prior.num_steps))
  k_latents, k_forcing = jax.random.split(key)
  q, enc_stats = encode(model, variables, images, train=True)
  sampled = relaxed_latents(k_latents, q, tau, weights.what_straight_through, weights.pres_relaxed)
  parse = one_hot_latents(
    batch['pres'], batch['where'], batch['what'], grid.num_locations, model.prior.num_parts
  )
  # Parse teacher forcing: per example, with probability rho, draw the parse.
  forced = jax.random.bernoulli(k_forcing, rho, (batch_size,))
  latents = jax.tree.map(
    lambda a, b: jnp.where(forced.reshape((-1,) + (1,) * (a.ndim - 1)), b, a), sampled, parse
  )
  canvases, maps = canvas_lib.render_relaxed_steps(
    grid, bank, latents.pres, latents.where, latents.what
  )
  out, dec_stats = decode(model, variables, canvases[:, -1], train=True)
  recon = distributions.nll(model.likelihood, out, images, model.num_mixtures)
  # The prior reads the history as given: no gradient through its inputs, and
  # none into its parameters unless it is fine-tuned (saves its backward pass).
  history = jax.lax.stop_gradient(canvas_lib.states_before(canvases, maps))
  prior_params = variables['params']['prior']
  if not weights.finetune_prior:
    prior_params = jax.lax.stop_gradient(prior_params)
  p = model.prior.apply({'params': prior_params}, *history, jnp.arange(model.prior.num_steps))
  kl = prior_kl(q, p, latents.pres)
  sup = parse_supervision(q, batch['pres'], batch['where'], batch['what'])
  loss = jnp.mean(recon + weights.beta * kl + weights.lambda_sup * sup)
  metrics = {
    'loss': loss,
    'recon': jnp.mean(recon),
    'kl': jnp.mean(kl),
    'sup': jnp.mean(sup),
    'nelbo': jnp.mean(recon + kl),
    'parts_drawn': jnp.mean(jnp.sum(latents.pres, axis=-1)),
    'tau': tau,
    'rho': rho,
  }
  return loss, (metrics, {'encoder': enc_stats, 'decoder': dec_stats})


# --- Importance-weighted bound (evaluation) ----------------------------------------


def hard_sample(key: jax.Array, q: dict, num_samples: int):
  """S hard samples of q: (pres, where, what) [S, B, T] and their log q [S, B].

  The location and part of an undrawn step are not part of z (the prior does
  not score them either), so they are marginalised out of log q.
  """
  k_pres, k_where, k_what = jax.random.split(key, 3)
  shape = (num_samples, *q['pres'].shape)
  pres = jax.random.bernoulli(k_pres, jax.nn.sigmoid(q['pres']), shape)
  where = jax.random.categorical(k_where, q['where'], shape=shape).astype(jnp.int32)
  what = jax.random.categorical(k_what, q['what'], shape=shape).astype(jnp.int32)
  q_per_sample = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_samples, *x.shape)), q)
  return (pres, where, what), losses.prior_sequence_log_prob(q_per_sample, pres, where, what)


def q_mode(q: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The mode of each factor of q: (pres = P(pres) > 1/2, argmax where, argmax what) [B, T]."""
  return q['pres'] > 0, jnp.argmax(q['where'], -1), jnp.argmax(q['what'], -1)


def log_importance_weights(
  model: NPDraw, variables: dict, bank: jax.Array, q: dict, images: jax.Array, key, num_samples
) -> jax.Array:
  """log p(x | z_s) + log p(z_s) - log q(z_s | x) for S hard samples, [S, B]."""
  (pres, where, what), log_q = hard_sample(key, q, num_samples)
  canvases, maps = canvas_lib.render_steps(model.grid, bank, pres, where, what)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  steps = model.prior.num_steps
  p = model.prior.apply(
    {'params': variables['params']['prior']},
    *map(flat, canvas_lib.states_before(canvases, maps)),
    jnp.arange(steps),
  )
  log_pz = losses.prior_sequence_log_prob(p, flat(pres), flat(where), flat(what))
  out, _ = decode(model, variables, flat(canvases[:, :, -1]), train=False)
  repeated = jnp.broadcast_to(images, (num_samples, *images.shape))
  log_px = -distributions.nll(model.likelihood, out, flat(repeated), model.num_mixtures)
  return (log_px + log_pz).reshape(num_samples, -1) - log_q


def iwae_bounds(
  model: NPDraw,
  variables: dict,
  bank: jax.Array,
  images: jax.Array,
  key: jax.Array,
  sample_counts: tuple[int, ...],
  chunk_size: int,
) -> dict[str, jax.Array]:
  """Per-image bounds on -log p(x) in nats at each S (losses.importance_weighted_bounds)."""
  q, _ = encode(model, variables, images, train=False)
  return losses.importance_weighted_bounds(
    lambda k, n: log_importance_weights(model, variables, bank, q, images, k, n),
    key,
    sample_counts,
    chunk_size,
  )
