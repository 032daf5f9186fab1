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

from npdraw_jax import errors
from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import distributions, gumbel, platform_kernels
from npdraw_jax.model.nets import decoder as decoder_lib
from npdraw_jax.model.nets import encoder as encoder_lib
from npdraw_jax.model.nets import layers
from npdraw_jax.model.nets import prior as prior_lib


@dataclasses.dataclass(frozen=True)
class NPDraw:
  """The modules and static settings of one model.

  likelihood_convention (distributions.LIKELIHOOD_CONVENTIONS): 'authors'
  reads the decoder's outputs on the authors' [0, 1] scale and trains on their
  likelihood; `decode` returns the parameters on ours either way, so that the
  bound, pictures and samples need not know. kernels: the form the modules
  were built in (platform_kernels.FORMS), which the renderer reads here.
  """

  encoder: encoder_lib.Encoder
  decoder: decoder_lib.Decoder
  prior: prior_lib.Prior
  grid: canvas_lib.Grid
  likelihood: str
  likelihood_convention: str
  num_mixtures: int
  image_size: int
  channels: int
  kernels: str


def make_networks(
  config: ml_collections.ConfigDict, num_locations: int
) -> tuple[
  encoder_lib.AuthorsEncoder | encoder_lib.Encoder, decoder_lib.AuthorsDecoder | decoder_lib.Decoder
]:
  """The (encoder, decoder) of config.model.networks: 'authors' (docs/model.md, 11) or 'ours'."""
  m, data = config.model, config.data
  dtype = layers.compute_dtype(m.compute_dtype)
  if data.image_size % data.canvas_size:
    raise ValueError('data.image_size must be 1 or 2 times data.canvas_size.')
  authors = layers.check_networks(m.networks) == 'authors'
  kernels = platform_kernels.resolve(m.kernels)
  encoder_args = {
    'num_steps': m.T,
    'num_locations': num_locations,
    'num_parts': m.K,
    'features': m.encoder_features,
    'head': m.encoder_head,
    'dtype': dtype,
  }
  decoder_args = {
    'features': m.decoder_features,
    'out_channels': distributions.num_outputs(m.likelihood, data.channels, m.num_mixtures),
    'upsample': data.image_size // data.canvas_size,
    'dtype': dtype,
    'kernels': kernels,
  }
  if not authors:
    return encoder_lib.Encoder(**encoder_args), decoder_lib.Decoder(**decoder_args)
  variance = layers.check_batch_norm_variance(m.batch_norm_variance)
  # Their mixture-of-logistics output conv has no bias; their other heads do.
  output_bias = m.likelihood != 'mixture_logistic'
  return (
    encoder_lib.AuthorsEncoder(**encoder_args, batch_norm_variance=variance, kernels=kernels),
    decoder_lib.AuthorsDecoder(
      **decoder_args, output_bias=output_bias, batch_norm_variance=variance
    ),
  )


def make_model(config: ml_collections.ConfigDict) -> NPDraw:
  """The model a configuration describes."""
  grid = canvas_lib.grid_from_config(config)
  m, data = config.model, config.data
  encoder, decoder = make_networks(config, grid.num_locations)
  return NPDraw(
    encoder=encoder,
    decoder=decoder,
    prior=prior_lib.make_prior(config, grid.num_locations),
    grid=grid,
    likelihood=m.likelihood,
    likelihood_convention=distributions.check_likelihood_convention(m.likelihood_convention),
    num_mixtures=m.num_mixtures,
    image_size=data.image_size,
    channels=data.channels,
    kernels=platform_kernels.resolve(m.kernels),
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
  """tau(e) = max(tau_min, tau0 * exp(-rate * e)) (docs/model.md, section 5)."""
  return jnp.maximum(tau_min, tau0 * jnp.exp(-rate * epoch))


TEACHER_FORCING_SCHEDULES = ('cumulative', 'exponential')


def teacher_forcing_rate(epoch, schedule: str, decay: float):
  """rho_e, the probability that an example is drawn from its parse in epoch e (docs/model.md, 7).

  'cumulative' (reference): rho starts at 1 and is multiplied by exp(-decay * e)
  at the start of epoch e, so rho_e = exp(-decay * e * (e + 1) / 2).
  'exponential': rho_e = exp(-decay * e).
  """
  epoch = jnp.asarray(epoch, jnp.float32)  # In int32, e * (e + 1) overflows past e = 46340.
  if schedule == 'cumulative':
    return jnp.exp(-decay * epoch * (epoch + 1) / 2)
  if schedule == 'exponential':
    return jnp.exp(-decay * epoch)
  raise errors.ConfigError(
    f'vae.teacher_forcing must be one of {TEACHER_FORCING_SCHEDULES}, not {schedule!r}.'
  )


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
  """Likelihood parameters for canvases [B, Hc, Wc, C], and the decoder's batch statistics.

  The parameters are on our [-1, 1] scale (distributions' module docstring)
  whatever the model's likelihood_convention.
  """
  out, stats = _apply_net(model.decoder, 'decoder', variables, canvas, train)
  if model.likelihood_convention == 'authors':
    out = distributions.from_unit_scale(model.likelihood, out, model.channels, model.num_mixtures)
  return out, stats


def reconstruction_loss(model: NPDraw, params: jax.Array, images: jax.Array) -> jax.Array:
  """-log p(x | canvas) [B] that stage 2 trains on: the authors' likelihood or the tiling one.

  Args:
    model: the modules and settings.
    params: [B, H, W, P] parameters from `decode`.
    images: [B, H, W, C] in [0, 1].
  """
  if model.likelihood_convention == 'authors':
    return distributions.authors_nll(model.likelihood, params, images, model.num_mixtures)
  return distributions.nll(model.likelihood, params, images, model.num_mixtures)


class Stage2Noise(NamedTuple):
  """The randomness of one stage-2 step, drawn before it is used, so that the
  same noise can be given to another implementation (the equivalence harness).

  Attributes:
    pres: [B, T] standard logistic noise; pres is drawn where logit + noise > 0.
    where: [B, T, L] standard Gumbel noise.
    what: [B, T, K] standard Gumbel noise.
    forcing: [B] uniform in [0, 1); an example is teacher-forced where forcing < rho.
    dropout: PRNG key of the prior's dropout.
  """

  pres: jax.Array
  where: jax.Array
  what: jax.Array
  forcing: jax.Array
  dropout: jax.Array


def draw_stage2_noise(key: jax.Array, q: dict) -> Stage2Noise:
  """The noise of a stage-2 step for q's logits (shapes from q)."""
  k_latents, k_forcing, k_dropout = jax.random.split(key, 3)
  k_what, k_where, k_pres = jax.random.split(k_latents, 3)
  return Stage2Noise(
    pres=jax.random.logistic(k_pres, q['pres'].shape, jnp.float32),
    where=jax.random.gumbel(k_where, q['where'].shape, jnp.float32),
    what=jax.random.gumbel(k_what, q['what'].shape, jnp.float32),
    forcing=jax.random.uniform(k_forcing, q['pres'].shape[:1], jnp.float32),
    dropout=k_dropout,
  )


def relaxed_latents(
  noise: Stage2Noise, q: dict, tau, what_straight_through: bool, pres_relaxed: bool
) -> Latents:
  """Training samples: Gumbel-softmax what, straight-through where, hard (or relaxed) pres."""
  pres = (
    gumbel.relaxed_bernoulli_with_noise(q['pres'], noise.pres, tau)
    if pres_relaxed
    else gumbel.bernoulli_with_noise(q['pres'], noise.pres)
  )
  return Latents(
    pres=pres,
    where=gumbel.gumbel_softmax_with_noise(q['where'], noise.where, tau, straight_through=True),
    what=gumbel.gumbel_softmax_with_noise(q['what'], noise.what, tau, what_straight_through),
  )


def one_hot_latents(pres, where, what, num_locations: int, num_parts: int) -> Latents:
  """Integer step sequences [B, T] (e.g. a parse) as one-hot latents."""
  return Latents(
    pres=pres.astype(jnp.float32),
    where=jax.nn.one_hot(where, num_locations),
    what=jax.nn.one_hot(what, num_parts),
  )


FORCING_UNDRAWN = ('nothing', 'parse_part')


def forcing_latents(pres, where, what, num_locations: int, num_parts: int, undrawn: str) -> Latents:
  """A parse [B, T] as the latents teacher forcing puts in place of q's samples.

  undrawn (FORCING_UNDRAWN) says what a step the parse leaves undrawn holds,
  which matters where q's pres draws it: 'nothing' (the authors') is no part
  (an all-zero `what`) at location 0, so nothing is pasted; 'parse_part' is
  the parse's part at the parse's location.
  """
  if undrawn == 'parse_part':
    return one_hot_latents(pres, where, what, num_locations, num_parts)
  drawn = pres.astype(jnp.float32)
  return Latents(
    pres=drawn,
    where=jax.nn.one_hot(jnp.where(pres, where, 0), num_locations),
    what=jax.nn.one_hot(what, num_parts) * drawn[..., None],
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


WHERE_GRADIENTS = ('none', 'straight_through')


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Static settings of the stage-2 loss: the vae.* fields of the same names.

  Attributes:
    beta: KL weight; 0 (reference CelebA) skips the prior entirely.
    lambda_sup: parse supervision weight.
    what_straight_through: hard one-hot `what` forward instead of the soft sample.
    pres_relaxed: a relaxed Bernoulli `pres` instead of a hard draw.
    finetune_prior: the prior's weights get the KL's gradient.
    teacher_forcing_pres: teacher forcing also replaces q's `pres` by the parse's.
    kl_through_history: the KL's gradient reaches q's samples through the
      canvases the prior reads.
    prior_dropout: the frozen prior runs in training mode (dropout on).
    where_gradient: 'none' (the rendered canvas gives `where` no gradient) or
      'straight_through'.
    forcing_undrawn: what teacher forcing pastes at a step the parse leaves
      undrawn (FORCING_UNDRAWN).
  """

  beta: float
  lambda_sup: float
  what_straight_through: bool
  pres_relaxed: bool
  finetune_prior: bool
  teacher_forcing_pres: bool
  kl_through_history: bool
  prior_dropout: bool
  where_gradient: str
  forcing_undrawn: str

  def __post_init__(self):
    if self.where_gradient not in WHERE_GRADIENTS:
      raise errors.ConfigError(
        f'vae.where_gradient must be one of {WHERE_GRADIENTS}, not {self.where_gradient!r}.'
      )
    if self.forcing_undrawn not in FORCING_UNDRAWN:
      raise errors.ConfigError(
        f'vae.forcing_undrawn must be one of {FORCING_UNDRAWN}, not {self.forcing_undrawn!r}.'
      )

  @classmethod
  def from_config(cls, vae: ml_collections.ConfigDict) -> 'LossWeights':
    """The settings in config.vae."""
    return cls(**{field.name: vae[field.name] for field in dataclasses.fields(cls)})


def teacher_force(
  forcing: jax.Array, rho, sampled: Latents, parse: Latents, force_pres: bool
) -> Latents:
  """Per example, with probability rho, the parse's where and what replace the samples.

  An example is forced where its uniform draw forcing [B] < rho. q's `pres`
  is kept (reference) unless force_pres.
  """
  chex.assert_shape(forcing, sampled.pres.shape[:1])
  forced = forcing < rho

  def choose(own, parsed):
    return jnp.where(forced.reshape(-1, *(1,) * (own.ndim - 1)), parsed, own)

  return Latents(
    pres=choose(sampled.pres, parse.pres) if force_pres else sampled.pres,
    where=choose(sampled.where, parse.where),
    what=choose(sampled.what, parse.what),
  )


class Stage2Terms(NamedTuple):
  """Per-example terms of the stage-2 loss and what they were computed from."""

  recon: jax.Array  # [B] -log p(x | canvas).
  sup: jax.Array  # [B] cross-entropy of q against the parse.
  kl: jax.Array | None  # [B] analytic KL to the prior; None when beta = 0.
  prior_logits: dict | None  # The prior's logits given the sampled history; None when beta = 0.
  latents: Latents  # The drawn (teacher-forced) latents, [B, T, ...].
  canvas: jax.Array  # [B, Hc, Wc, C] the decoder's input.


def stage2_terms(
  model: NPDraw,
  variables: dict,
  bank: jax.Array,
  batch: dict,
  q: dict,
  noise: Stage2Noise,
  tau,
  rho,
  weights: LossWeights,
) -> tuple[Stage2Terms, dict]:
  """The terms of the stage-2 loss for q's logits and the step's noise (see stage2_loss).

  Returns:
    (terms, the decoder's new batch statistics).
  """
  images = batch['image']
  chex.assert_equal_shape([q['pres'], batch['pres'], batch['where'], batch['what']])
  sampled = relaxed_latents(noise, q, tau, weights.what_straight_through, weights.pres_relaxed)
  parse = forcing_latents(
    batch['pres'],
    batch['where'],
    batch['what'],
    model.grid.num_locations,
    bank.shape[0],
    weights.forcing_undrawn,
  )
  latents = teacher_force(noise.forcing, rho, sampled, parse, weights.teacher_forcing_pres)
  render_args = (model.grid, bank, latents.pres, latents.where, latents.what)
  where_gradient = weights.where_gradient == 'straight_through'
  if weights.beta == 0:  # Nothing depends on the prior: no history, and the prior is not run.
    final_canvas = canvas_lib.render_relaxed(*render_args, where_gradient, model.kernels)
    history = None
  else:
    # One rendering serves the decoder (last canvas) and the prior (the history).
    canvases, maps = canvas_lib.render_relaxed_steps(
      *render_args, where_gradient, model.prior.history
    )
    final_canvas, history = canvases[:, -1], canvas_lib.states_before(canvases, maps)
  out, dec_stats = decode(model, variables, final_canvas, train=True)
  recon = reconstruction_loss(model, out, images)
  sup = parse_supervision(q, batch['pres'], batch['where'], batch['what'])
  kl = p = None
  if history is not None:
    if not weights.kl_through_history:
      history = jax.lax.stop_gradient(history)  # Saves the backward pass through the prior.
    prior_params = variables['params']['prior']
    if not weights.finetune_prior:
      prior_params = jax.lax.stop_gradient(prior_params)
    p = model.prior.apply(
      {'params': prior_params},
      *history,
      jnp.arange(q['pres'].shape[-1]),
      train=weights.prior_dropout,
      rngs={'dropout': noise.dropout},
    )
    kl = prior_kl(q, p, latents.pres)
  terms = Stage2Terms(recon, sup, kl, p, latents, final_canvas)
  return terms, dec_stats


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
  """loss = recon + beta * KL + lambda_sup * SUP, batch-averaged (docs/model.md, section 7).

  Args:
    model: the modules.
    variables: {'params': {...}, 'batch_stats': {...}}.
    bank: [K, p, p, C] parts.
    batch: 'image' [B, H, W, C] and the example's parse 'pres', 'where', 'what' [B, T].
    key: PRNG key of this step.
    tau: Gumbel temperature.
    rho: probability that an example is drawn from its parse (teacher forcing).
    weights: the static settings.

  Returns:
    (loss, (metrics, new batch_stats)); the metrics have no 'kl' and 'nelbo'
    when beta = 0.
  """
  q, enc_stats = encode(model, variables, batch['image'], train=True)
  noise = draw_stage2_noise(key, q)
  terms, dec_stats = stage2_terms(model, variables, bank, batch, q, noise, tau, rho, weights)
  per_example = terms.recon + weights.lambda_sup * terms.sup
  if terms.kl is not None:
    per_example = per_example + weights.beta * terms.kl
  loss = jnp.mean(per_example)
  metrics = {
    'loss': loss,
    'recon': jnp.mean(terms.recon),
    'sup': jnp.mean(terms.sup),
    'parts_drawn': jnp.mean(jnp.sum(terms.latents.pres, axis=-1)),
    'tau': tau,
    'rho': rho,
  }
  if terms.kl is not None:
    metrics['kl'] = jnp.mean(terms.kl)
    metrics['nelbo'] = jnp.mean(terms.recon + terms.kl)
  return loss, (metrics, {'encoder': enc_stats, 'decoder': dec_stats})


def q_mode(q: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The mode of each factor of q: (pres = P(pres) > 1/2, argmax where, argmax what) [B, T]."""
  return q['pres'] > 0, jnp.argmax(q['where'], -1), jnp.argmax(q['what'], -1)
