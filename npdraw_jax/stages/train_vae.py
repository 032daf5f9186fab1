"""Stage 2: encoder and decoder against the frozen prior (docs/model.md, section 7).

  train_and_evaluate(config, workdir)

reads the part bank, the parses and the trained prior, trains for
vae.train_steps (or vae.epochs when it is 0) with checkpoints in DIR/vae/
holding parameters, optimizer state, batch statistics, step and RNG (the data
position is a function of the step), and logs to DIR/metrics.jsonl. With
data.holdout_size > 0 it bounds the NLL of the held-out training images at
every checkpoint (split 'holdout') and keeps the best checkpoint in
DIR/vae/best, which the eval stage uses; with vae.patience > 0 it stops early
when that bound has not improved for vae.patience steps
(training.stops_early).
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, input_pipeline, run_dir, sharding, training
from npdraw_jax.model import bound, canvas, npdraw
from npdraw_jax.stages import scoring, train_prior

STAGE = 'vae'
HOLDOUT_METRIC = 'nll_iwae'  # The held-out bound that selects the best checkpoint.
PARSE_KEYS = ('pres', 'where', 'what')


class TrainState(training.TrainState):
  """Adds the encoder's and decoder's batch-norm statistics."""

  batch_stats: dict


def num_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """vae.train_steps, or vae.epochs whole epochs when it is 0."""
  if config.vae.train_steps > 0:
    return config.vae.train_steps
  return config.vae.epochs * input_pipeline.steps_per_epoch(num_examples, config.vae.batch_size)


def _adam(lr: float, weight_decay: float) -> optax.GradientTransformation:
  """Adam, or with weight_decay > 0 AdamW: each step also subtracts
  lr * weight_decay * the parameter (decoupled from the gradient's moments)."""
  return optax.adamw(lr, weight_decay=weight_decay) if weight_decay > 0 else optax.adam(lr)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam: encoder at lr, decoder at 0.1 lr, both with vae.weight_decay; the
  prior frozen unless finetune_prior.

  Parameters are grouped by their top-level name ('encoder', 'decoder', 'prior').
  """
  lr, weight_decay = config.vae.lr, config.vae.weight_decay
  return optax.multi_transform(
    {
      'encoder': _adam(lr, weight_decay),
      'decoder': _adam(0.1 * lr, weight_decay),
      'prior': optax.adam(lr) if config.vae.finetune_prior else optax.set_to_zero(),
    },
    lambda params: {name: name for name in params},
  )


def checkpoint_settings(config: ml_collections.ConfigDict) -> dict:
  """What a stage-2 checkpoint must agree with: the prior's and the nets' shapes."""
  m = config.model
  return {
    'prior': train_prior.checkpoint_settings(config, canvas.grid_from_config(config).num_locations),
    'image_size': config.data.image_size,
    'model': {
      k: m[k]
      for k in (
        'networks',
        'likelihood',
        'likelihood_convention',
        'num_mixtures',
        'encoder_head',
        'encoder_features',
        'decoder_features',
      )
    },
    'finetune_prior': config.vae.finetune_prior,
  }


def training_settings(config: ml_collections.ConfigDict) -> dict:
  """{config field: value} of what shapes stage 2's training (its record): the
  prior's training settings, the loss weights and switches, optimizer, batch,
  length, temperature and teacher-forcing schedules, and the held-out bound
  that selects the best checkpoint."""
  v = config.vae
  # Not vae.patience: no step's state depends on it, and a run stopped early
  # trains on when it is raised, as a resumed run.
  fields = [
    *(f'vae.{field.name}' for field in dataclasses.fields(npdraw.LossWeights)),
    'vae.batch_size',
    'vae.lr',
    *(['vae.weight_decay'] if v.weight_decay > 0 else []),  # Records before it stay valid.
    'vae.train_steps',
    *(['vae.epochs'] if v.train_steps == 0 else []),  # Else it does not count.
    'vae.tau0',
    'vae.tau_min',
    'vae.tau_rate',
    'vae.teacher_forcing',
    'vae.teacher_forcing_decay',
    *(['vae.schedule_epoch_examples'] if v.schedule_epoch_examples > 0 else []),
    'vae.holdout_iwae_samples',
    'model.batch_norm_variance',
  ]
  return {
    **train_prior.training_settings(config),
    **checkpointing.config_fields(config, fields),
  }


class ParseLookup:
  """The parse of each example id of a split (ids come with every batch)."""

  def __init__(self, parses: dict[str, np.ndarray]):
    self.ids = parses['index']
    self.sequences = {k: parses[k] for k in PARSE_KEYS}
    self.order = np.argsort(self.ids, kind='stable')

  def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    pos = np.minimum(np.searchsorted(self.ids, ids, sorter=self.order), len(self.ids) - 1)
    rows = self.order[pos]
    if not np.array_equal(self.ids[rows], ids):
      raise ValueError('Some examples have no parse: rerun the parse stage for this data.')
    return {k: v[rows] for k, v in self.sequences.items()}


def create_state(variables: dict, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state holding `variables` ({'params', 'batch_stats'})."""
  return TrainState.create(
    apply_fn=None,
    params=variables['params'],
    tx=tx,
    rng=rng,
    batch_stats=variables['batch_stats'],
  )


def gradient_step(state: TrainState, loss_fn) -> tuple[TrainState, dict]:
  """One optimizer step on loss_fn(params) -> (loss, (metrics, new batch_stats))."""
  (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics['grad_norm'] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def schedule_steps_per_epoch(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Steps in an epoch of the temperature and teacher-forcing schedules: the
  training split's steps_per_epoch, or with vae.schedule_epoch_examples > 0
  that many examples' worth of vae.batch_size batches."""
  examples = config.vae.schedule_epoch_examples
  if examples == 0:
    return steps_per_epoch
  return input_pipeline.steps_per_epoch(examples, config.vae.batch_size)


def make_train_step(model: npdraw.NPDraw, config: ml_collections.ConfigDict, mesh, steps_per_epoch):
  """The jitted stage-2 step (state, bank, batch) -> (state, metrics); an epoch
  of the training split is steps_per_epoch steps."""
  v = config.vae
  weights = npdraw.LossWeights.from_config(v)
  schedule_epoch_steps = schedule_steps_per_epoch(config, steps_per_epoch)

  def train_step(state, bank, batch):
    key = jax.random.fold_in(state.rng, state.step)
    epoch = state.step // schedule_epoch_steps
    tau = npdraw.gumbel_temperature(epoch, v.tau0, v.tau_min, v.tau_rate)
    rho = npdraw.teacher_forcing_rate(epoch, v.teacher_forcing, v.teacher_forcing_decay)

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      return npdraw.stage2_loss(model, variables, bank, batch, key, tau, rho, weights)

    return gradient_step(state, loss_fn)

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
    train_step,
    in_shardings=(replicated, replicated, batched),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )


def make_init_fn(config, model: npdraw.NPDraw, prior_params):
  """A function creating the fresh stage-2 state around the trained prior."""
  init_key, loop_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 2))
  tx = make_optimizer(config)

  def init_fn():
    return create_state(npdraw.init_variables(model, init_key, prior_params), tx, loop_key)

  return init_fn


def check_recorded_settings(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> None:
  """Raises when DIR/vae holds checkpoints of other settings; writes nothing."""
  checkpointing.check_settings(
    os.path.join(workdir, run_dir.VAE_DIR),
    checkpoint_settings(config),
    training_settings(config),
    allow_changed_settings,
  )


def open_checkpoints(
  config, workdir, allow_changed_settings: bool = False, read_only: bool = False
) -> checkpointing.Checkpoints:
  """The stage-2 checkpoints in DIR/vae, checked against the configuration."""
  return checkpointing.Checkpoints(
    os.path.join(workdir, run_dir.VAE_DIR),
    checkpoint_settings(config),
    keep=config.vae.keep_checkpoints,
    every=config.vae.checkpoint_every,
    config=config,
    training=training_settings(config),
    allow_changed_settings=allow_changed_settings,
    read_only=read_only,
  )


def open_best_checkpoint(workdir: str, read_only: bool = False) -> checkpointing.BestCheckpoint:
  """DIR/vae/best: the stage-2 checkpoint with the lowest held-out bound so far."""
  return checkpointing.BestCheckpoint(
    os.path.join(workdir, run_dir.VAE_DIR), HOLDOUT_METRIC, read_only
  )


def make_holdout_check(
  config: ml_collections.ConfigDict,
  mesh,
  best: checkpointing.BestCheckpoint,
  bounds_fn: Callable,
  num_samples: int,
  is_8bit: bool,
  stage: str,
) -> Callable:
  """state -> the held-out bound's summary; keeps the state in `best` when it is
  lower. Stage 2's and the baseline VAE's held-out check.

  bounds_fn(state, global batch, key) -> per-image bounds at S = num_samples
  and 'mask', as scoring.test_bounds takes them; the bound is computed as the
  eval stage computes it on the test split, over the whole held-out split.
  """
  holdout = input_pipeline.load_split(config.data, 'holdout')  # Whole, as the test split.

  def evaluate_holdout(state: training.TrainState) -> dict[str, float]:
    summary = scoring.test_bounds(
      config,
      holdout,
      mesh,
      lambda batch, key: bounds_fn(state, batch, key),
      is_8bit=is_8bit,
      description=f'held-out bound (S = {num_samples})',
    )
    summary['holdout_images'] = summary.pop('test_images')
    step, value = int(jax.device_get(state.step)), summary[HOLDOUT_METRIC]
    if best.update(step, state, value):
      logging.info(
        'Stage %s: step %d has the best held-out %s, %.4f.', stage, step, HOLDOUT_METRIC, value
      )
    return summary

  return evaluate_holdout


def make_holdout_evaluation(config, model, bank, mesh, best: checkpointing.BestCheckpoint):
  """Stage 2's make_holdout_check: the importance-weighted bound with
  vae.holdout_iwae_samples hard samples."""
  num_samples = config.vae.holdout_iwae_samples
  bound.sample_chunk(num_samples, config.eval.chunk_size, 'vae.holdout_iwae_samples')
  eval_step = scoring.make_eval_step(model, mesh, (num_samples,), config.eval.chunk_size)

  def bounds_fn(state: TrainState, batch, key):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return eval_step(variables, bank, batch, key)

  is_8bit = model.likelihood != 'bernoulli'
  return make_holdout_check(config, mesh, best, bounds_fn, num_samples, is_8bit, STAGE)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> TrainState:
  """Trains (or finishes training) the encoder and decoder; returns the state.

  allow_changed_settings: continue DIR/vae's checkpoints (and use DIR/prior's)
  under training settings other than those recorded (else that is an error).
  """
  v = config.vae
  local_batch = sharding.check_batch_size(v.batch_size, 'vae.batch_size')
  mesh = sharding.make_mesh()
  # Fails clearly when the parses (or the bank) are missing or stale.
  parses = ParseLookup(train_prior.load_parses(config, workdir, 'train', PARSE_KEYS + ('index',)))
  bank = sharding.replicate(jnp.asarray(run_dir.load_bank(workdir).parts), mesh)
  train = input_pipeline.load_split(config.data, 'train', jax.process_index(), jax.process_count())
  steps_per_epoch = input_pipeline.steps_per_epoch(train.num_examples, local_batch)
  num_steps = num_train_steps(config, train.num_examples * jax.process_count())

  model = npdraw.make_model(config)
  prior_params = train_prior.restore_trained_params(config, workdir, mesh, allow_changed_settings)
  checkpoints = open_checkpoints(config, workdir, allow_changed_settings)
  state = training.restore_or_init(checkpoints, make_init_fn(config, model, prior_params), mesh)
  best = open_best_checkpoint(workdir) if config.data.holdout_size > 0 else None
  early_stop = training.held_out_stop(best, v.patience, v.checkpoint_every) if best else None
  start = int(jax.device_get(state.step))
  # A run that stopped early trains no step: nothing to record.
  stopped = early_stop is not None and early_stop(start) is not None
  train_prior.record_training(checkpoints, start, start if stopped else num_steps, STAGE)
  train_step = make_train_step(model, config, mesh, steps_per_epoch)

  def batch_at(step):
    batch = input_pipeline.train_batch(
      train, config.data, local_batch, config.seed, step, sharding.data_shards()
    )
    del batch['canvas_image']  # The model renders its own canvases.
    batch.update(parses(batch['index']))
    return sharding.to_global(batch, mesh)

  metrics_log = training.MetricsLog(workdir, STAGE)
  state = training.train_loop(
    stage=STAGE,
    state=state,
    train_step=lambda s, b: train_step(s, bank, b),
    batch_at=batch_at,
    num_steps=num_steps,
    checkpoints=checkpoints,
    metrics_log=metrics_log,
    log_every=v.log_every,
    eval_every=v.checkpoint_every if best else 0,
    description=f'{v.batch_size} images per step, {steps_per_epoch} steps per epoch',
    evaluate=make_holdout_evaluation(config, model, bank, mesh, best) if best else None,
    eval_split='holdout',
    early_stop=early_stop,
  )
  if best:
    best.close()
  checkpoints.close()
  metrics_log.close()
  return state


# --- The finished stage, read back ------------------------------------------------


class FinishedVAE:
  """Stage 2's finished checkpoints and the trained prior's, opened once and
  read-only: which VAE checkpoint the eval stage uses (`chosen`), and its
  restore. Finished: trained to the step count, or stopped early (vae.patience:
  training.is_finished). Clear errors name the stage to run when an upstream
  output is missing. Use as a context manager, or close() it.
  """

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
  ):
    self.config = config
    # The parses list every training example: no need to load the images.
    num_train = len(train_prior.load_parses(config, workdir, 'train')['pres'])
    self._prior = train_prior.open_trained(config, workdir, allow_changed_settings)
    self._checkpoints = open_checkpoints(config, workdir, allow_changed_settings, read_only=True)
    self._best = None
    if config.data.holdout_size > 0:
      self._best = open_best_checkpoint(workdir, read_only=True)
      if self._best.best() is None:
        self._best.close()
        self._best = None
    wanted, v = num_train_steps(config, num_train), config.vae
    found = self._checkpoints.latest_step()
    best_step = training.best_step(self._best)
    if not training.is_finished(found or 0, wanted, best_step, v.patience, v.checkpoint_every):
      self.close()
      raise errors.MissingArtifactError(
        f'The eval stage needs the VAE trained to step {wanted} (or stopped early) in '
        f'{os.path.join(workdir, run_dir.VAE_DIR)} (found: {found}): run the vae stage first.'
      )

  @property
  def chosen(self) -> dict:
    """{'which': 'best' or 'last', 'step', 'trained_steps'}: the best held-out
    checkpoint when data.holdout_size > 0 and one was kept, else the last; and
    the step of the last (where training ended)."""
    latest = self._checkpoints.latest_step()
    if self._best is None:
      return {'which': 'last', 'step': latest, 'trained_steps': latest}
    return {'which': 'best', 'step': self._best.best()[0], 'trained_steps': latest}

  def restore(self, mesh) -> tuple[npdraw.NPDraw, TrainState]:
    """(model, state) of the chosen checkpoint; the log says which."""
    model = npdraw.make_model(self.config)
    prior_params = train_prior.restore_params(self.config, self._prior, mesh)
    init_fn = make_init_fn(self.config, model, prior_params)
    if self._best is None:
      logging.info('Using the last VAE checkpoint, step %d.', self._checkpoints.latest_step())
      return model, training.restore_or_init(self._checkpoints, init_fn, mesh)
    step, value = self._best.best()
    logging.info(
      'Using the VAE checkpoint with the best held-out bound: step %d, held-out %s %.4f '
      '(the last checkpoint is step %d).',
      step,
      self._best.metric,
      value,
      self._checkpoints.latest_step(),
    )
    return model, self._best.restore(training.abstract_state(init_fn, mesh))

  def close(self) -> None:
    for opened in (self._best, self._checkpoints, self._prior):
      if opened is not None:
        opened.close()

  def __enter__(self) -> 'FinishedVAE':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def evaluated_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> dict:
  """FinishedVAE.chosen: the VAE checkpoint the eval stage uses; reads only."""
  with FinishedVAE(config, workdir, allow_changed_settings) as finished:
    return finished.chosen


def restore_trained_model(
  config: ml_collections.ConfigDict, workdir: str, mesh, allow_changed_settings: bool = False
):
  """(model, state) of the finished stage 2 (FinishedVAE.restore); reads only."""
  with FinishedVAE(config, workdir, allow_changed_settings) as finished:
    return finished.restore(mesh)
