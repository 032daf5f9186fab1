"""The allowed range of every configuration field, checked before any stage runs.

  ranges.check(config)  # raises errors.ConfigError naming every field out of range

RULES gives each numeric field of configs/default.py (and the string fields
with a fixed set of values) its range; CONSISTENCY the rules between fields.
A value out of range would otherwise end in a traceback deep in a stage, a
loop that never ends or a silently wrong run (issue 23).
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import ml_collections

from npdraw_jax import errors
from npdraw_jax.infra import input_pipeline
from npdraw_jax.model import canvas, distributions, npdraw, parsing, platform_kernels
from npdraw_jax.model.nets import encoder, layers

_SEED_END = 2**63  # numpy's and JAX's seeds are non-negative 64-bit integers.


@dataclasses.dataclass(frozen=True)
class Rule:
  """An allowed range: `text` says it after 'must be', `holds` tests a value."""

  text: str
  holds: Callable[[Any], bool]


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  # Finite: an infinite or NaN rate or weight is never meant.
  return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def integer_at_least(low: int) -> Rule:
  return Rule(f'an integer >= {low}', lambda v: _is_int(v) and v >= low)


def number_above(low: float) -> Rule:
  return Rule(f'a finite number > {low}', lambda v: _is_number(v) and v > low)


def number_at_least(low: float) -> Rule:
  return Rule(f'a finite number >= {low}', lambda v: _is_number(v) and v >= low)


def number_in(low: float, high: float, low_open: bool, high_open: bool) -> Rule:
  """The interval from low to high; an open end excludes its bound."""
  text = f'a number in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'

  def holds(v) -> bool:
    if not _is_number(v):
      return False
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    return above and below

  return Rule(text, holds)


def one_of(*choices) -> Rule:
  # Of the same type too: True == 1 and 1.0 == 1 are no channel counts.
  return Rule(
    f'one of {", ".join(map(repr, choices))}',
    lambda v: any(type(v) is type(c) and v == c for c in choices),
  )


def _is_sample_counts(value) -> bool:
  counts = value if isinstance(value, (tuple, list)) else (value,)
  return bool(counts) and all(_is_int(s) and s >= 1 for s in counts)


POSITIVE = integer_at_least(1)
NON_NEGATIVE = integer_at_least(0)
SEED = Rule('an integer in [0, 2**63)', lambda v: _is_int(v) and 0 <= v < _SEED_END)
RATE = number_above(0)  # Learning rates and temperatures.
WEIGHT = number_at_least(0)  # Loss weights, decays, thresholds, tolerances.
SAMPLE_COUNTS = Rule(
  'a positive integer or a non-empty tuple of positive integers', _is_sample_counts
)

# field -> its allowed range. Every numeric field of configs/default.py has one
# (tests/config_ranges_test.py fails on one that has not).
RULES: dict[str, Rule] = {
  'seed': SEED,
  # Data.
  'data.folder_test_fraction': number_in(0, 1, low_open=True, high_open=True),
  'data.train_fraction': number_in(0, 1, low_open=True, high_open=False),
  'data.train_subset_seed': SEED,
  'data.holdout_size': NON_NEGATIVE,  # 0: none held out.
  'data.image_size': POSITIVE,
  'data.canvas_size': POSITIVE,
  'data.channels': one_of(1, 3),
  'data.center_crop': NON_NEGATIVE,  # 0: no crop.
  'data.binarize': one_of(*input_pipeline.BINARIZE_MODES),
  # Part bank.
  'partbank.extract_stride': POSITIVE,
  'partbank.empty_threshold': number_in(0, 1, low_open=False, high_open=False),  # A mean pixel.
  'partbank.max_patches': POSITIVE,
  'partbank.max_iters': NON_NEGATIVE,  # 0: the k-means++ centres as they are.
  'partbank.tol': WEIGHT,
  'partbank.chunk_size': POSITIVE,
  # Structured latents.
  'model.K': POSITIVE,
  'model.patch_size': POSITIVE,
  'model.location_stride': POSITIVE,
  'model.T': POSITIVE,
  'model.likelihood': one_of(*distributions.LIKELIHOODS),
  'model.num_mixtures': POSITIVE,
  'model.likelihood_convention': one_of(*distributions.LIKELIHOOD_CONVENTIONS),
  'model.prior_history': one_of(*canvas.PRIOR_HISTORIES),
  'model.networks': one_of(*layers.NETWORKS),
  'model.encoder_head': one_of(*encoder.HEADS),
  'model.encoder_features': POSITIVE,
  'model.decoder_features': POSITIVE,
  'model.compute_dtype': one_of(*layers.COMPUTE_DTYPES),
  'model.kernels': one_of(*platform_kernels.KERNELS),
  'model.batch_norm_variance': one_of(*layers.BATCH_NORM_VARIANCES),
  # Parser.
  'parse.order': one_of(*parsing.ORDERS),
  'parse.threshold': WEIGHT,
  'parse.batch_size': POSITIVE,
  # Stage 1: the prior.
  'prior.token_features': POSITIVE,
  'prior.d_model': POSITIVE,
  'prior.num_layers': POSITIVE,
  'prior.num_heads': POSITIVE,
  'prior.head_dim': NON_NEGATIVE,  # 0: d_model // num_heads.
  'prior.mlp_dim': POSITIVE,
  'prior.dropout': number_in(0, 1, low_open=False, high_open=True),
  'prior.batch_size': POSITIVE,
  'prior.lr': RATE,
  'prior.warmup_steps': NON_NEGATIVE,
  'prior.train_steps': POSITIVE,
  'prior.log_every': POSITIVE,
  'prior.eval_every': NON_NEGATIVE,  # 0: evaluated at the last step only.
  'prior.checkpoint_every': POSITIVE,
  'prior.keep_checkpoints': POSITIVE,
  'prior.patience': NON_NEGATIVE,  # 0: off (CONSISTENCY: > 0 needs held-out images, checks).
  'prior.sample_temperature': RATE,
  'prior.sample_top_k': NON_NEGATIVE,  # 0: the whole distribution.
  'prior.num_samples': POSITIVE,
  # Stage 2: encoder and decoder.
  'vae.batch_size': POSITIVE,
  'vae.lr': RATE,
  'vae.weight_decay': WEIGHT,
  'vae.beta': WEIGHT,  # 0: no KL (reference CelebA).
  'vae.lambda_sup': WEIGHT,
  'vae.epochs': NON_NEGATIVE,  # Counts only when vae.train_steps is 0 (CONSISTENCY).
  'vae.train_steps': NON_NEGATIVE,  # 0: vae.epochs instead.
  'vae.tau0': RATE,
  'vae.tau_min': RATE,
  'vae.tau_rate': WEIGHT,
  'vae.teacher_forcing': one_of(*npdraw.TEACHER_FORCING_SCHEDULES),
  'vae.teacher_forcing_decay': WEIGHT,
  'vae.schedule_epoch_examples': NON_NEGATIVE,
  'vae.forcing_undrawn': one_of(*npdraw.FORCING_UNDRAWN),
  'vae.where_gradient': one_of(*npdraw.WHERE_GRADIENTS),
  'vae.log_every': POSITIVE,
  'vae.checkpoint_every': POSITIVE,
  'vae.keep_checkpoints': POSITIVE,
  'vae.holdout_iwae_samples': POSITIVE,
  'vae.patience': NON_NEGATIVE,  # 0: off (CONSISTENCY: > 0 needs held-out images).
  # Baseline VAE.
  'baseline.hidden': POSITIVE,
  'baseline.latent_dim': POSITIVE,
  'baseline.lr': RATE,
  'baseline.batch_size': POSITIVE,
  'baseline.train_steps': POSITIVE,
  'baseline.log_every': POSITIVE,
  'baseline.checkpoint_every': POSITIVE,
  'baseline.keep_checkpoints': POSITIVE,
  'baseline.patience': NON_NEGATIVE,  # 0: off (CONSISTENCY: > 0 needs held-out images).
  # Evaluation.
  'eval.batch_size': POSITIVE,
  'eval.iwae_samples': SAMPLE_COUNTS,
  'eval.chunk_size': POSITIVE,
  'eval.num_pictures': POSITIVE,
  'eval.fid_samples': integer_at_least(2),  # A covariance needs two feature vectors.
  'eval.authors_samples': NON_NEGATIVE,  # 0: off.
}


@dataclasses.dataclass(frozen=True)
class Consistency:
  """A rule between fields: `holds` tests their values (in the order of
  `fields`), `text` says it after the values. Tested only once each field
  is in its own range."""

  fields: tuple[str, ...]
  text: str
  holds: Callable[..., bool]


def _num_locations(canvas_size: int, stride: int) -> int:
  """L = ceil(canvas / stride)^2, as canvas.Grid counts them."""
  return math.ceil(canvas_size / stride) ** 2


def _drawn_in_chunks(num_samples: int, chunk_size: int) -> bool:
  """Whether num_samples splits into passes of min(chunk_size, num_samples),
  as bound.sample_chunk asks."""
  return num_samples % min(chunk_size, num_samples) == 0


def _max_count(counts) -> int:
  return max(counts) if isinstance(counts, (tuple, list)) else counts


CONSISTENCY: tuple[Consistency, ...] = (
  Consistency(
    ('vae.train_steps', 'vae.epochs'),
    'one must be >= 1 (vae.train_steps > 0 trains that many steps, else vae.epochs epochs)',
    lambda steps, epochs: steps >= 1 or epochs >= 1,
  ),
  Consistency(
    ('data.canvas_size', 'data.image_size'),
    'the canvas must be the image size or half of it (the decoder upsamples by 1 or 2)',
    lambda canvas_size, image_size: image_size in (canvas_size, 2 * canvas_size),
  ),
  Consistency(
    ('model.patch_size', 'data.canvas_size'),
    'a part must fit on the canvas: model.patch_size <= data.canvas_size',
    lambda patch_size, canvas_size: patch_size <= canvas_size,
  ),
  Consistency(
    ('model.location_stride', 'data.canvas_size'),
    'the grid stride must not exceed the canvas: model.location_stride <= data.canvas_size',
    lambda stride, canvas_size: stride <= canvas_size,
  ),
  Consistency(
    ('parse.order', 'model.T', 'data.canvas_size', 'model.location_stride'),
    'a raster parse draws one step per location: model.T must be L = '
    'ceil(data.canvas_size / model.location_stride)**2',
    lambda order, T, canvas_size, stride: (
      order != 'raster' or T == _num_locations(canvas_size, stride)
    ),
  ),
  Consistency(
    ('partbank.max_patches', 'model.K'),
    'k-means needs at least one patch per part: partbank.max_patches >= model.K',
    lambda max_patches, K: max_patches >= K,
  ),
  Consistency(
    ('prior.head_dim', 'prior.d_model', 'prior.num_heads'),
    'prior.head_dim = 0 (d_model // num_heads) needs prior.num_heads to divide prior.d_model',
    lambda head_dim, d_model, num_heads: head_dim > 0 or d_model % num_heads == 0,
  ),
  Consistency(
    ('eval.iwae_samples', 'eval.authors_samples', 'eval.chunk_size'),
    'the samples drawn, max(eval.iwae_samples, eval.authors_samples), must be a multiple '
    'of eval.chunk_size when larger than it',
    lambda counts, authors, chunk: _drawn_in_chunks(max(_max_count(counts), authors), chunk),
  ),
  Consistency(
    ('vae.holdout_iwae_samples', 'eval.chunk_size', 'data.holdout_size'),
    'with images held out, vae.holdout_iwae_samples must be a multiple of eval.chunk_size '
    'when larger than it',
    lambda samples, chunk, held_out: held_out == 0 or _drawn_in_chunks(samples, chunk),
  ),
  Consistency(
    ('vae.schedule_epoch_examples', 'vae.batch_size'),
    'a schedule epoch (vae.schedule_epoch_examples > 0) must hold at least one batch: '
    'vae.schedule_epoch_examples >= vae.batch_size',
    lambda examples, batch_size: examples == 0 or examples >= batch_size,
  ),
  Consistency(
    ('vae.patience', 'data.holdout_size'),
    'early stopping (vae.patience > 0) watches the held-out bound: data.holdout_size must be > 0',
    lambda patience, held_out: patience == 0 or held_out > 0,
  ),
  Consistency(
    ('prior.patience', 'data.holdout_size', 'prior.eval_every'),
    'early stopping (prior.patience > 0) watches the NLL of the held-out parses: '
    'data.holdout_size and prior.eval_every must be > 0',
    lambda patience, held_out, every: patience == 0 or (held_out > 0 and every > 0),
  ),
  Consistency(
    ('baseline.patience', 'data.holdout_size'),
    'early stopping (baseline.patience > 0) watches the held-out bound: data.holdout_size '
    'must be > 0',
    lambda patience, held_out: patience == 0 or held_out > 0,
  ),
)


def value_of(config: ml_collections.ConfigDict, field: str):
  """config's value of a dotted field such as 'model.K'."""
  return functools.reduce(getattr, field.split('.'), config)


def _assignments(config: ml_collections.ConfigDict, fields: tuple[str, ...]) -> str:
  return ', '.join(f'{field} = {value_of(config, field)!r}' for field in fields)


def violations(config: ml_collections.ConfigDict) -> list[str]:
  """One sentence per field out of its range or rule between fields broken."""
  found, out_of_range = [], set()
  for field, rule in RULES.items():
    if not rule.holds(value_of(config, field)):
      found.append(f'{_assignments(config, (field,))}: must be {rule.text}.')
      out_of_range.add(field)
  for rule in CONSISTENCY:
    if out_of_range.isdisjoint(rule.fields):  # Else its values may not even compare.
      if not rule.holds(*(value_of(config, field) for field in rule.fields)):
        found.append(f'{_assignments(config, rule.fields)}: {rule.text}.')
  return found


def check(config: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError, one line naming every field out of range."""
  found = violations(config)
  if found:
    raise errors.ConfigError(' '.join([*found, 'configs/default.py says what each field means.']))
