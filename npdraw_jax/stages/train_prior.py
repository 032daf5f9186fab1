"""Stage 1: the Transformer prior, trained by teacher forcing on the parses.

  train_and_evaluate(config, workdir)

reads DIR/partbank.npz and DIR/parses.npz, trains for prior.train_steps with
checkpoints in DIR/prior/ (resuming from the newest), logs train and test NLL
(nats per image) to DIR/metrics.jsonl and TensorBoard, and draws
DIR/prior_samples.png at the end. With prior.patience > 0 it also checks the
NLL of the held-out images' parses every prior.eval_every steps (split
'holdout'), keeps the best checkpoint in DIR/prior/best, which the later stages
use, and stops early when it has not improved for prior.patience steps.
"""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from npdraw_jax import errors
from npdraw_jax.infra import checkpointing, input_pipeline, pictures, run_dir, sharding, training
from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import prior_likelihood, sampling
from npdraw_jax.model.nets import prior as prior_lib
from npdraw_jax.stages import bank_parse

STAGE = 'prior'
HOLDOUT_METRIC = 'nll'  # The held-out NLL that selects the best checkpoint.
SEQUENCE_KEYS = ('pres', 'where', 'what')


def load_parses(
  config: ml_collections.ConfigDict, workdir: str, split: str, keys=SEQUENCE_KEYS
) -> dict:
  """The arrays `keys` (by default 'pres', 'where', 'what' [N, T]) of a split's
  parses, checked against the config."""
  # The bank too: the later stages load it. A damaged file was logged as such.
  for stage, name in (('parse', run_dir.PARSES_FILE), ('bank', run_dir.BANK_FILE)):
    if not bank_parse.is_current(config, workdir, stage):
      raise errors.MissingArtifactError(
        f'{os.path.join(workdir, name)} is missing or was made under other settings: run '
        'the bank and parse stages first (--stages=bank,parse).'
      )
  return run_dir.load_parses(workdir, split, keys)


def checkpoint_settings(config: ml_collections.ConfigDict, num_locations: int) -> dict:
  """What a prior checkpoint must agree with: its shapes and training data."""
  p = config.prior
  return {
    'parses': bank_parse.parse_settings(config),
    'model': {
      'T': config.model.T,
      'K': config.model.K,
      'L': num_locations,
      'canvas_size': config.data.canvas_size,
      'channels': config.data.channels,
      'networks': config.model.networks,
      'prior_history': config.model.prior_history,  # The input it learned to read.
      **{
        k: p[k]
        for k in ('token_features', 'd_model', 'num_layers', 'num_heads', 'head_dim', 'mlp_dim')
      },
    },
  }


# Every setting besides the restore settings that shapes what the prior learns.
TRAINING_FIELDS = (
  'seed',
  'model.compute_dtype',
  'prior.dropout',
  'prior.batch_size',
  'prior.lr',
  'prior.warmup_steps',
  'prior.train_steps',  # The length of the cosine schedule.
)


def training_settings(config: ml_collections.ConfigDict) -> dict:
  """{config field: value} of what shapes the prior's training (its record),
  prior.patience when on: which checkpoint the later stages use depends on it,
  and stage 2 records these settings."""
  patience = ('prior.patience',) if config.prior.patience > 0 else ()
  return checkpointing.config_fields(config, TRAINING_FIELDS + patience)


def history_free_nll(
  train: dict[str, np.ndarray], test: dict[str, np.ndarray], num_locations: int, num_parts: int
) -> float:
  """Test NLL (nats per image) of the best model that ignores the history.

  Per-step marginals of pres, where and what fitted on the train parses with
  add-one smoothing: the baseline a history-reading prior must beat.
  """
  num_steps = train['pres'].shape[1]
  steps = np.arange(num_steps)

  def marginal(key, size):
    counts = np.ones((num_steps, size))
    np.add.at(counts, (np.broadcast_to(steps, train[key].shape), train[key]), train['pres'])
    return counts / counts.sum(axis=1, keepdims=True)

  drawn = (train['pres'].sum(axis=0) + 1) / (len(train['pres']) + 2)
  where, what = marginal('where', num_locations), marginal('what', num_parts)
  pres = test['pres']
  log_lik = np.where(pres, np.log(drawn), np.log1p(-drawn)) + pres * (
    np.log(where[steps, test['where']]) + np.log(what[steps, test['what']])
  )
  return float(-log_lik.sum(axis=1).mean())


def teacher_forced_logits(model, params, grid, bank, sequences, train=False, rngs=None):
  """The prior's logits on given step sequences [B, T] (canvases rendered here)."""
  canvases, maps = canvas_lib.render_steps(
    grid, bank, sequences['pres'], sequences['where'], sequences['what'], model.history
  )
  before = canvas_lib.states_before(canvases, maps)
  steps = jnp.arange(model.num_steps)
  return model.apply({'params': params}, *before, steps, train=train, rngs=rngs)


def _nll(model, params, grid, bank, sequences, train=False, rngs=None):
  """-log p(z) of each sequence, [B] nats."""
  logits = teacher_forced_logits(model, params, grid, bank, sequences, train, rngs)
  return -prior_likelihood.prior_sequence_log_prob(logits, *(sequences[k] for k in SEQUENCE_KEYS))


def make_steps(model, grid, mesh, schedule):
  """The jitted train and eval steps; the bank is an argument, not a constant."""
  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def train_step(state, bank, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      nll = _nll(model, params, grid, bank, batch, train=True, rngs={'dropout': rng})
      return jnp.mean(nll)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {'nll': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
    return state.apply_gradients(grads=grads), metrics

  def eval_step(state, bank, batch):
    nll = _nll(model, state.params, grid, bank, batch)
    mask = batch['mask'].astype(nll.dtype)
    return {'nll': jnp.sum(nll * mask), 'count': jnp.sum(mask)}

  train = jax.jit(
    train_step,
    in_shardings=(replicated, replicated, batched),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  evaluate = jax.jit(eval_step, in_shardings=(replicated, replicated, batched))
  return train, evaluate


def make_init_fn(config: ml_collections.ConfigDict, model: prior_lib.Prior, schedule):
  """A function creating the fresh stage-1 TrainState (seeded by config.seed)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  init_key, loop_key = jax.random.split(jax.random.key(config.seed))
  side, channels = config.data.canvas_size, config.data.channels

  def init_fn():
    history = jnp.zeros((1, model.num_steps, side, side, channels))
    params = model.init(init_key, history, history[..., :1], jnp.arange(model.num_steps))
    return training.TrainState.create(
      apply_fn=model.apply, params=params['params'], tx=tx, rng=loop_key
    )

  return init_fn


def check_recorded_settings(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> None:
  """Raises when DIR/prior holds checkpoints of other settings; writes nothing."""
  checkpointing.check_settings(
    os.path.join(workdir, run_dir.PRIOR_DIR),
    checkpoint_settings(config, canvas_lib.grid_from_config(config).num_locations),
    training_settings(config),
    allow_changed_settings,
  )


def open_checkpoints(
  config, workdir, grid, allow_changed_settings: bool = False, read_only: bool = False
) -> checkpointing.Checkpoints:
  """The stage-1 checkpoints in DIR/prior, checked against the configuration."""
  return checkpointing.Checkpoints(
    os.path.join(workdir, run_dir.PRIOR_DIR),
    checkpoint_settings(config, grid.num_locations),
    keep=config.prior.keep_checkpoints,
    every=config.prior.checkpoint_every,
    config=config,
    training=training_settings(config),
    allow_changed_settings=allow_changed_settings,
    read_only=read_only,
  )


def open_best_checkpoint(
  config: ml_collections.ConfigDict, directory: str, read_only: bool = False
) -> checkpointing.BestCheckpoint | None:
  """DIR/prior/best (directory: DIR/prior) when prior.patience > 0, else None."""
  if config.prior.patience == 0:
    return None
  return checkpointing.BestCheckpoint(directory, HOLDOUT_METRIC, read_only=read_only)


def open_trained(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> checkpointing.Checkpoints:
  """DIR/prior's checkpoints, read-only, checked to be of this configuration and
  finished: trained to prior.train_steps or stopped early (prior.patience); a
  MissingArtifactError naming the stage otherwise."""
  p = config.prior
  grid = canvas_lib.grid_from_config(config)
  checkpoints = open_checkpoints(config, workdir, grid, allow_changed_settings, read_only=True)
  step = checkpoints.latest_step()
  best = open_best_checkpoint(config, checkpoints.directory, read_only=True)
  best_step = training.best_step(best)
  if best:
    best.close()
  if step is None or not training.is_finished(
    step, p.train_steps, best_step, p.patience, p.eval_every
  ):
    checkpoints.close()
    raise errors.MissingArtifactError(
      f'The later stages need the prior trained to step {p.train_steps} in '
      f'{checkpoints.directory} (found: {step}): run the prior stage first.'
    )
  return checkpoints


def restore_params(config: ml_collections.ConfigDict, checkpoints: checkpointing.Checkpoints, mesh):
  """The prior's parameters (replicated) from open_trained's checkpoints: the
  best held-out one when prior.patience > 0, else the latest."""
  grid = canvas_lib.grid_from_config(config)
  model = prior_lib.make_prior(config, grid.num_locations)
  p = config.prior
  schedule = training.warmup_decay_schedule(p.lr, p.warmup_steps, p.train_steps)
  init_fn = make_init_fn(config, model, schedule)
  best = open_best_checkpoint(config, checkpoints.directory, read_only=True)
  try:
    params = best_params(best, init_fn, mesh)
  finally:
    if best:
      best.close()
  if params is None:
    params = training.restore_or_init(checkpoints, init_fn, mesh).params
  return params


def best_params(best: checkpointing.BestCheckpoint | None, init_fn, mesh):
  """The parameters of the best held-out checkpoint, or None when none is kept
  (prior.patience = 0, or no check has run yet)."""
  if best is None or best.best() is None:
    return None
  return best.restore(training.abstract_state(init_fn, mesh)).params


def restore_trained_params(
  config: ml_collections.ConfigDict, workdir: str, mesh, allow_changed_settings: bool = False
):
  """The trained prior's parameters (replicated), for the later stages; reads only."""
  checkpoints = open_trained(config, workdir, allow_changed_settings)
  params = restore_params(config, checkpoints, mesh)
  checkpoints.close()
  return params


def record_training(
  checkpoints: checkpointing.Checkpoints, start: int, num_steps: int, stage: str
) -> None:
  """Records the run's settings when it trains steps start..num_steps; says
  so when changed settings have no step left to act on."""
  if start < num_steps:
    checkpoints.record_training(start)
  elif checkpoints.has_unapplied_changes():
    logging.warning(
      'Stage %s is already trained to step %d: no step is left to train under the changed '
      'settings, so its checkpoints and their record stay those of the recorded settings.',
      stage,
      start,
    )


def _rows_of_process(*arrays: np.ndarray):
  """This process's contiguous share of a global batch's row arrays."""
  own = slice(*input_pipeline.shard(len(arrays[0]), jax.process_index(), jax.process_count()))
  return arrays[0][own] if len(arrays) == 1 else tuple(a[own] for a in arrays)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, allow_changed_settings: bool = False
) -> training.TrainState:
  """Trains (or finishes training) the prior; returns the final state.

  allow_changed_settings: continue DIR/prior's checkpoints under training
  settings other than those recorded (else that is an error).
  """
  grid = canvas_lib.grid_from_config(config)
  train_parses = load_parses(config, workdir, 'train')  # Current parses imply a current bank.
  test_parses = load_parses(config, workdir, 'test')
  holdout_parses = load_parses(config, workdir, 'holdout') if config.prior.patience > 0 else None
  bank_host = run_dir.load_bank(workdir).parts
  p = config.prior
  sharding.check_batch_size(p.batch_size, 'prior.batch_size')
  mesh = sharding.make_mesh()
  bank = sharding.replicate(jnp.asarray(bank_host), mesh)

  model = prior_lib.make_prior(config, grid.num_locations)
  schedule = training.warmup_decay_schedule(p.lr, p.warmup_steps, p.train_steps)
  init_fn = make_init_fn(config, model, schedule)
  checkpoints = open_checkpoints(config, workdir, grid, allow_changed_settings)
  state = training.restore_or_init(checkpoints, init_fn, mesh)
  record_training(checkpoints, int(jax.device_get(state.step)), p.train_steps, STAGE)
  train_step, eval_step = make_steps(model, grid, mesh, schedule)
  num_train = len(train_parses['pres'])

  def batch_at(step):
    rows = input_pipeline.batch_rows(num_train, p.batch_size, config.seed, step)
    rows = _rows_of_process(rows)
    return sharding.to_global({k: v[rows] for k, v in train_parses.items()}, mesh)

  def evaluate_on(parses, state):
    batches = (
      {**{k: v[rows] for k, v in parses.items()}, 'mask': mask}
      for rows, mask in itertools.starmap(
        _rows_of_process, input_pipeline.eval_rows(len(parses['pres']), p.batch_size)
      )
    )
    return training.evaluate_in_batches(lambda s, b: eval_step(s, bank, b), state, batches, mesh)

  metrics_log = training.MetricsLog(workdir, STAGE)
  best = open_best_checkpoint(config, checkpoints.directory)

  def evaluate_holdout(state):
    """The held-out NLL (the loop logs it); keeps the best state; logs the test NLL."""
    step = int(jax.device_get(state.step))
    metrics_log.write(step, 'test', evaluate_on(test_parses, state))
    results = evaluate_on(holdout_parses, state)
    if best.update(step, state, results[HOLDOUT_METRIC]):
      logging.info(
        'Stage %s: step %d has the best held-out NLL, %.4f.', STAGE, step, results[HOLDOUT_METRIC]
      )
    return results

  if int(state.step) == 0:
    baseline = history_free_nll(train_parses, test_parses, grid.num_locations, config.model.K)
    logging.info(
      'Stage %s: a history-free prior scores %.3f nats on the test parses.', STAGE, baseline
    )
    metrics_log.write(0, 'test', {'nll_history_free': baseline})
  state = training.train_loop(
    stage=STAGE,
    state=state,
    train_step=lambda s, b: train_step(s, bank, b),
    batch_at=batch_at,
    num_steps=p.train_steps,
    checkpoints=checkpoints,
    metrics_log=metrics_log,
    log_every=p.log_every,
    eval_every=p.eval_every,
    description=f'{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters',
    evaluate=evaluate_holdout if best else functools.partial(evaluate_on, test_parses),
    eval_split='holdout' if best else 'test',
    early_stop=(
      training.held_out_stop(best, p.patience, p.eval_every, watched='the held-out NLL')
      if best
      else None
    ),
  )
  params = best_params(best, init_fn, mesh)  # What the later stages use.
  if params is None:
    params = state.params
  if best:
    best.close()
  checkpoints.close()
  metrics_log.close()
  if jax.process_index() == 0:
    params, bank = sharding.local_copy((params, bank))
    write_samples(config, workdir, model, params, grid, bank)
  return state


def write_samples(config, workdir, model, params, grid, bank) -> None:
  """DIR/prior_samples.png: the final canvases of prior samples."""
  p = config.prior
  sampler = sampling.make_sampler(model, grid, p.num_samples, p.sample_top_k)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  samples = sampler(params, bank, key, p.sample_temperature)
  final = np.asarray(samples.canvases[:, -1])
  columns = int(np.ceil(np.sqrt(len(final))))
  pictures.save_grid(os.path.join(workdir, run_dir.PRIOR_SAMPLES_PICTURE), final, columns, scale=3)
