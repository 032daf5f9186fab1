"""Tests for configs/ranges.py: every numeric field has its range, the shipped
configs lie in range, and a value out of range stops the command at once.

The ranges expected here are written out independently of ranges.RULES (from
configs/default.py and the code that reads each field); where the code has its
own check (bound.sample_chunk, canvas.Grid, prior.make_prior) the rules between
fields are compared with it.
"""

import importlib
import math
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile

import ml_collections
import pytest
from absl.testing import absltest, parameterized

import configs
from configs import default, ranges, tiny
from npdraw_jax import errors
from npdraw_jax.model import bound, canvas
from npdraw_jax.model.nets import prior

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 120

# field -> (values inside, the boundary first; values just outside; other
# fields set alongside so that the rules between fields hold). Bases on
# configs/tiny.py: canvas 16, p = s = 4, T = L = 16, K = 16, eval.chunk_size 2.
_SMALLEST_CANVAS = {'model.patch_size': 1, 'model.location_stride': 1, 'model.T': 1}
CASES = {
  'seed': ([0, 2**63 - 1], [-1, 2**63], {}),
  'data.folder_test_fraction': ([1e-9, 1 - 1e-9], [0.0, 1.0], {}),
  'data.train_fraction': ([1.0, 1e-9], [0.0, 1 + 1e-9, -0.5], {}),
  'data.train_subset_seed': ([0, 2**63 - 1], [-1, 2**63], {}),
  'data.holdout_size': ([0], [-1], {}),
  'data.image_size': ([1], [0, -28], {'data.canvas_size': 1, **_SMALLEST_CANVAS}),
  'data.canvas_size': ([1], [0], {'data.image_size': 2, **_SMALLEST_CANVAS}),
  'data.channels': ([1, 3], [0, 2, 4], {}),
  'data.center_crop': ([0], [-1], {}),
  'partbank.extract_stride': ([1], [0], {}),
  'partbank.empty_threshold': ([0.0, 1.0], [-1e-9, 1 + 1e-9], {}),
  'partbank.max_patches': ([1], [0], {'model.K': 1}),
  'partbank.max_iters': ([0], [-1], {}),
  'partbank.tol': ([0.0], [-1e-9], {}),
  'partbank.chunk_size': ([1], [0], {}),
  'model.K': ([1], [0, -50, True], {}),
  'model.patch_size': ([1], [0], {}),
  'model.location_stride': ([1], [0], {'model.T': 256}),  # L = 16**2.
  'model.T': ([1], [0], {'parse.order': 'greedy'}),
  'model.num_mixtures': ([1], [0], {}),
  'model.encoder_features': ([1], [0], {}),
  'model.decoder_features': ([1], [0], {}),
  'parse.threshold': ([0.0], [-1e-9], {}),
  'parse.batch_size': ([1], [0], {}),
  'prior.token_features': ([1], [0], {}),
  'prior.d_model': ([1], [0], {}),
  'prior.num_layers': ([1], [0], {}),
  'prior.num_heads': ([1], [0], {}),
  'prior.head_dim': ([0], [-1], {}),
  'prior.mlp_dim': ([1], [0], {}),
  'prior.dropout': ([0.0, 1 - 1e-9], [-1e-9, 1.0], {}),
  'prior.batch_size': ([1], [0], {}),
  'prior.lr': ([1e-12], [0.0, -1e-4, math.inf, math.nan], {}),
  'prior.warmup_steps': ([0], [-1], {}),
  'prior.train_steps': ([1], [0], {}),
  'prior.log_every': ([1], [0], {}),
  'prior.eval_every': ([0], [-1], {}),
  'prior.checkpoint_every': ([1], [0], {}),
  'prior.keep_checkpoints': ([1], [0], {}),
  'prior.patience': ([0, 1], [-1], {}),  # tiny holds 64 images out, checks every 10 steps.
  'prior.sample_temperature': ([1e-12], [0.0], {}),
  'prior.sample_top_k': ([0], [-1], {}),
  'prior.num_samples': ([1], [0], {}),
  'vae.batch_size': ([1], [0], {}),
  'vae.lr': ([1e-12], [0.0, -1e-3], {}),
  'vae.weight_decay': ([0.0, 1.0], [-1e-9], {}),
  'vae.beta': ([0.0], [-1e-9, -1.0], {}),
  'vae.lambda_sup': ([0.0], [-1e-9], {}),
  'vae.epochs': ([0], [-1], {}),  # tiny trains vae.train_steps = 20.
  'vae.train_steps': ([0], [-1], {}),  # Then vae.epochs = 661 count.
  'vae.tau0': ([1e-12], [0.0], {}),
  'vae.tau_min': ([1e-12], [0.0], {}),
  'vae.tau_rate': ([0.0], [-1e-9], {}),
  'vae.teacher_forcing_decay': ([0.0], [-1e-9], {}),
  'vae.schedule_epoch_examples': ([0, 32], [-1], {}),  # tiny: 32 images a step.
  'vae.log_every': ([1], [0], {}),
  'vae.checkpoint_every': ([1], [0], {}),
  'vae.keep_checkpoints': ([1], [0], {}),
  'vae.holdout_iwae_samples': ([1], [0], {}),
  'vae.patience': ([0, 1], [-1], {}),  # tiny holds 64 images out.
  'baseline.hidden': ([1], [0], {}),
  'baseline.latent_dim': ([1], [0], {}),
  'baseline.lr': ([1e-12], [0.0], {}),
  'baseline.batch_size': ([1], [0], {}),
  'baseline.train_steps': ([1], [0], {}),
  'baseline.log_every': ([1], [0], {}),
  'baseline.checkpoint_every': ([1], [0], {}),
  'baseline.keep_checkpoints': ([1], [0], {}),
  'baseline.patience': ([0, 1], [-1], {}),
  'eval.batch_size': ([1], [0], {}),
  'eval.iwae_samples': ([(1,), (1, 4), [2, 4]], [(), (0,), (4, -1), (1.0, 4)], {}),
  'eval.chunk_size': ([1], [0], {}),
  'eval.num_pictures': ([1], [0], {}),
  'eval.fid_samples': ([2], [1], {}),
  'eval.authors_samples': ([0], [-1], {}),
}

# The string fields with a fixed set of values (configs/default.py's comments).
CHOICES = {
  'data.binarize': ('dynamic', 'threshold', 'none'),
  'model.likelihood': ('bernoulli', 'logistic', 'mixture_logistic'),
  'model.likelihood_convention': ('authors', 'tiling'),
  'model.prior_history': ('every_step', 'drawn'),
  'model.networks': ('authors', 'ours'),
  'model.encoder_head': ('mlp', 'fcn'),
  'model.compute_dtype': ('float32', 'bfloat16'),
  'model.kernels': ('cpu', 'plain', 'auto'),
  'model.batch_norm_variance': ('unbiased', 'biased'),
  'parse.order': ('raster', 'greedy'),
  'vae.teacher_forcing': ('cumulative', 'exponential'),
  'vae.forcing_undrawn': ('nothing', 'parse_part'),
  'vae.where_gradient': ('none', 'straight_through'),
}

# Every config module of the repository, with the arguments its get_config takes.
SHIPPED = {
  'default': [None],
  'mnist': [None],
  'mnist_cpu': [None],
  'mnist_demo': [None],
  'omniglot': [None],
  'cifar10': [None],
  'celeba': [None],
  'tiny': [None, 'mnist', 'celeba'],
  'low_data': [None, 'demo', 'recommended'],
  'ablation': [None],
}


def leaves(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """{'section.field': value} of every leaf of a (nested) config."""
  out = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(leaves(value, f'{prefix}{name}.'))
    else:
      out[f'{prefix}{name}'] = value
  return out


def is_numeric(value) -> bool:
  """An int or float (not a bool), or a tuple of them."""
  if isinstance(value, tuple):
    return bool(value) and all(is_numeric(v) for v in value)
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def with_values(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """A copy of config with {'section.field': value} set."""
  config = config.copy_and_resolve_references()
  for field, value in values.items():
    *sections, name = field.split('.')
    owner = config
    for section in sections:
      owner = owner[section]
    del owner[name]  # Drops the field's type, so any value can stand there.
    owner[name] = value
  return config


def violation(values: dict, base: ml_collections.ConfigDict | None = None) -> str | None:
  """check's message on tiny (or base) with values set, None when it passes."""
  try:
    ranges.check(with_values(base or tiny.get_config(), values))
  except errors.ConfigError as error:
    return str(error)
  return None


class TableTest(absltest.TestCase):
  def test_every_numeric_field_has_a_rule(self):
    numeric = {field for field, value in leaves(default.get_config()).items() if is_numeric(value)}
    # The walk itself: nested sections, tuples in, bools out.
    self.assertContainsSubset({'seed', 'model.K', 'vae.lr', 'eval.iwae_samples'}, numeric)
    self.assertNotIn('data.invert', numeric)
    self.assertEqual(sorted(numeric - set(ranges.RULES)), [], 'numeric fields without a range')

  def test_every_rule_names_a_field(self):
    fields = set(leaves(default.get_config()))
    self.assertEqual(sorted(set(ranges.RULES) - fields), [])
    for rule in ranges.CONSISTENCY:
      self.assertContainsSubset(rule.fields, fields)

  def test_every_rule_has_cases_here(self):
    self.assertEqual(sorted(ranges.RULES), sorted([*CASES, *CHOICES]))


class ShippedConfigsTest(parameterized.TestCase):
  def test_every_config_module_is_listed(self):
    modules = {
      name
      for _, name, _ in pkgutil.iter_modules(configs.__path__)
      if hasattr(importlib.import_module(f'configs.{name}'), 'get_config')
    }
    self.assertEqual(sorted(modules), sorted(SHIPPED))

  @parameterized.named_parameters(
    (f'{name}_{arg}', name, arg) for name, args in SHIPPED.items() for arg in args
  )
  def test_passes(self, name, arg):
    config = importlib.import_module(f'configs.{name}').get_config(arg)
    self.assertEqual(ranges.violations(config), [])
    ranges.check(config)


class FieldRangeTest(parameterized.TestCase):
  @parameterized.named_parameters((field, field) for field in CASES)
  def test_boundary_passes_and_just_outside_fails(self, field):
    inside, outside, alongside = CASES[field]
    for value in inside:
      self.assertIsNone(violation({**alongside, field: value}), f'{field} = {value!r}')
    for value in outside:
      message = violation({**alongside, field: value})
      self.assertIsNotNone(message, f'{field} = {value!r} passed')
      self.assertIn(f'{field} = {value!r}: must be ', message)
      self.assertNotIn('\n', message)

  @parameterized.named_parameters((field, field) for field in CHOICES)
  def test_choices(self, field):
    for value in CHOICES[field]:
      self.assertIsNone(violation({field: value}), f'{field} = {value!r}')
    message = violation({field: 'nonesuch'})
    self.assertIn(f"{field} = 'nonesuch': must be one of ", message)
    for value in CHOICES[field]:
      self.assertIn(repr(value), message)

  def test_a_bare_sample_count_stands_for_one(self):
    self.assertIsNone(violation({'eval.iwae_samples': 4}))
    self.assertIn('eval.iwae_samples = 0:', violation({'eval.iwae_samples': 0}))

  def test_every_violation_in_one_line(self):
    message = violation({'model.K': 0, 'prior.lr': -1e-4, 'vae.beta': -1.0})
    self.assertEqual(message.splitlines(), [message])
    for part in ('model.K = 0: ', 'prior.lr = -0.0001: ', 'vae.beta = -1.0: '):
      self.assertIn(part, message)

  def test_a_field_out_of_range_skips_the_rules_that_read_it(self):
    # The canvas rule would compare the string 'x' with numbers.
    message = violation({'data.image_size': 'x'})
    self.assertIn("data.image_size = 'x': must be ", message)
    self.assertNotIn('data.canvas_size =', message)


class ConsistencyTest(absltest.TestCase):
  def assert_verdict(self, values: dict, passes: bool, names: tuple[str, ...] = ()):
    message = violation(values)
    if passes:
      self.assertIsNone(message, values)
    else:
      self.assertIsNotNone(message, f'{values} passed')
      for field in names:
        self.assertIn(f'{field} = ', message)

  def test_vae_trains_steps_or_epochs(self):
    fields = ('vae.train_steps', 'vae.epochs')
    self.assert_verdict({'vae.train_steps': 0, 'vae.epochs': 0}, False, fields)
    self.assert_verdict({'vae.train_steps': 0, 'vae.epochs': 1}, True)
    self.assert_verdict({'vae.train_steps': 1, 'vae.epochs': 0}, True)

  def test_schedule_epoch_holds_a_batch(self):
    names = ('vae.schedule_epoch_examples', 'vae.batch_size')
    for examples, passes in ((0, True), (31, False), (32, True), (1000, True)):
      values = {'vae.schedule_epoch_examples': examples, 'vae.batch_size': 32}
      self.assert_verdict(values, passes, names)

  def test_canvas_is_the_image_or_half_of_it(self):
    names = ('data.canvas_size', 'data.image_size')
    half = {'data.image_size': 16, 'data.canvas_size': 8, 'model.T': 4}  # L = (8 / 4)**2.
    self.assert_verdict(half, True)
    self.assert_verdict({'data.image_size': 16, 'data.canvas_size': 16}, True)
    self.assert_verdict({'data.canvas_size': 15, 'model.T': 16}, False, names)
    self.assert_verdict({**half, 'data.image_size': 32}, False, names)  # A quarter.
    # 15 // 2 = 7: what input_pipeline.validate allows, but the decoder upsamples by 2.
    self.assert_verdict({**half, 'data.image_size': 15, 'data.canvas_size': 7}, False, names)

  def test_part_and_stride_fit_the_canvas(self):
    for patch, stride, steps in ((16, 4, 16), (17, 4, 16), (4, 16, 1), (4, 17, 1)):
      values = {'model.patch_size': patch, 'model.location_stride': stride, 'model.T': steps}
      fits = max(patch, stride) <= 16
      self.assert_verdict(values, fits, () if fits else ('data.canvas_size',))
      if patch > 16:  # canvas.Grid refuses it too.
        with self.assertRaises(ValueError):
          canvas.Grid(canvas_size=16, patch_size=patch, stride=stride)

  def test_raster_parse_has_one_step_per_location(self):
    for stride in (3, 4, 5, 7):
      locations = canvas.Grid(canvas_size=16, patch_size=4, stride=stride).num_locations
      for steps in (locations - 1, locations, locations + 1):
        values = {'model.location_stride': stride, 'model.T': steps}
        self.assert_verdict(values, steps == locations, ('model.T', 'parse.order'))
        self.assert_verdict({**values, 'parse.order': 'greedy'}, True)

  def test_bank_has_a_patch_per_part(self):
    names = ('partbank.max_patches', 'model.K')
    self.assert_verdict({'partbank.max_patches': 16}, True)
    self.assert_verdict({'partbank.max_patches': 15}, False, names)

  def test_heads_divide_the_width_when_head_dim_is_0(self):
    for heads, head_dim in ((2, 0), (3, 0), (4, 0), (3, 8)):
      values = {'prior.num_heads': heads, 'prior.head_dim': head_dim}
      config = with_values(tiny.get_config(), values)
      try:
        prior.make_prior(config, num_locations=16)
        builds = True
      except ValueError:
        builds = False
      self.assertEqual(builds, head_dim > 0 or 32 % heads == 0)  # tiny: d_model 32.
      self.assert_verdict(values, builds, ('prior.head_dim', 'prior.num_heads'))

  def test_samples_split_into_chunks_as_the_bound_draws_them(self):
    def draws(num_samples, chunk):
      try:
        bound.sample_chunk(num_samples, chunk, 'field')
      except errors.ConfigError:
        return False
      return True

    names = ('eval.iwae_samples', 'eval.authors_samples', 'eval.chunk_size')
    for counts, authors, chunk in (
      ((1, 4), 4, 2),
      ((1, 5), 4, 2),
      ((1, 6), 0, 4),
      ((1, 4), 5, 2),
      ((1, 4), 0, 8),
      ((3,), 0, 2),
    ):
      values = {'eval.iwae_samples': counts, 'eval.authors_samples': authors}
      values['eval.chunk_size'] = chunk
      verdict = draws(max(*counts, authors), chunk)
      self.assert_verdict(values, verdict, names)

  def test_holdout_samples_split_into_chunks(self):
    names = ('vae.holdout_iwae_samples', 'eval.chunk_size')
    self.assert_verdict({'vae.holdout_iwae_samples': 3}, False, names)  # chunk 2.
    self.assert_verdict({'vae.holdout_iwae_samples': 3, 'data.holdout_size': 0}, True)
    self.assert_verdict({'vae.holdout_iwae_samples': 4}, True)
    self.assert_verdict({'vae.holdout_iwae_samples': 1}, True)  # Fewer than a chunk.

  def test_early_stopping_needs_held_out_images(self):
    for field in ('vae.patience', 'baseline.patience'):
      self.assert_verdict({field: 100, 'data.holdout_size': 0}, False, (field, 'data.holdout_size'))
      self.assert_verdict({field: 100, 'data.holdout_size': 1}, True)
      self.assert_verdict({field: 0, 'data.holdout_size': 0}, True)

  def test_the_priors_early_stopping_needs_held_out_images_and_checks(self):
    names = ('prior.patience', 'data.holdout_size', 'prior.eval_every')
    self.assert_verdict({'prior.patience': 100, 'data.holdout_size': 0}, False, names)
    self.assert_verdict({'prior.patience': 100, 'prior.eval_every': 0}, False, names)
    self.assert_verdict({'prior.patience': 100}, True)
    self.assert_verdict({'prior.patience': 0, 'data.holdout_size': 0, 'prior.eval_every': 0}, True)


def _start(workdir: str, *args: str) -> subprocess.Popen:
  """`python -m experiments.mnist` on configs/tiny.py, as tests/launch_test.py runs it."""
  command = [sys.executable, '-m', 'experiments.mnist', f'--workdir={workdir}']
  environ = {k: v for k, v in os.environ.items() if k != 'NPDRAW_VERBOSE'}
  return subprocess.Popen(
    [*command, '--config=configs/tiny.py', *args],
    cwd=_REPO,
    env={**environ, 'TF_CPP_MIN_LOG_LEVEL': '2'},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.slow
class CommandLineTest(absltest.TestCase):
  """The command stops before writing; both commands run at once (seconds each)."""

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root)

  def assert_one_line(self, process: subprocess.Popen) -> str:
    """Status 2, no traceback, one 'Error:' line, the last; returns it."""
    _, stderr = process.communicate(timeout=_TIMEOUT_S)
    self.assertEqual(process.returncode, 2, stderr)
    self.assertNotIn('Traceback', stderr)
    lines = stderr.strip().splitlines()
    self.assertEqual([line for line in lines if line.startswith('Error:')], lines[-1:], stderr)
    return lines[-1]

  def test_out_of_range_field_and_workdir_that_is_a_file(self):
    workdir = os.path.join(self.root, 'run')
    a_file = os.path.join(self.root, 'file')
    with open(a_file, 'w') as f:
      f.write('kept')
    out_of_range = _start(workdir, '--config.model.K=0')
    file_workdir = _start(a_file)

    last = self.assert_one_line(out_of_range)
    self.assertTrue(last.startswith('Error: model.K = 0: must be '), last)
    written = os.listdir(workdir) if os.path.exists(workdir) else []
    self.assertEqual([name for name in written if name != '.lock'], [])

    last = self.assert_one_line(file_workdir)
    self.assertEqual(
      last, f'Error: --workdir {a_file} exists and is not a directory: name another.'
    )
    with open(a_file) as f:
      self.assertEqual(f.read(), 'kept')


if __name__ == '__main__':
  absltest.main()
