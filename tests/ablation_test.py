"""The ablation runner on the tiny config: variants, shared upstream, table.

References: each run's results.json (the table must show its numbers), the
variant table VARIANTS (each run's recorded config must differ from the
reference's in exactly those fields), and the reference's prior files.
"""

import filecmp
import json
import os
import re
import tempfile

import pytest
import tiny_run
from absl import app
from absl.testing import absltest
from flax import traverse_util
from PIL import Image

from experiments import ablation, study

pytestmark = pytest.mark.slow  # Minutes: started first (tests/conftest.py).

# One stage-2 variant runs (which variants share the prior is checked without
# running them: test_only_stage2_variants_share_the_upstream).
VARIANTS = ('reference', 'no_prior_input_gradient')


def _record(workdir, variant):
  with open(os.path.join(workdir, variant, study.RESULTS_FILE)) as f:
    return json.load(f)


class AblationTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tiny_run.study_config(**{'vae.checkpoint_every': 2})  # Checks at 2 and 4.
    cls.workdir = tempfile.mkdtemp()
    cls.table = ablation.run(cls.config, cls.workdir, ablation.parse_variants(list(VARIANTS)))

  def test_table_shows_each_runs_numbers(self):
    with open(os.path.join(self.workdir, ablation.TABLE_FILE)) as f:
      self.assertEqual(f.read(), self.table)
    rows = {}
    for line in self.table.splitlines():
      match = re.match(
        r'\| `(\w+)` \|[^|]*\| ([-\d.]+) ± ([\d.]+) \| ([-\d.]+) ± ([\d.]+) \|'
        r'.* (\d+) / (\d+) \|$',
        line,
      )
      if match:
        rows[match[1]] = tuple(map(float, match.groups()[1:]))
    self.assertEqual(list(rows), list(ablation.parse_variants(list(VARIANTS))))
    for variant, (nll, nll_se, authors, authors_se, evaluated, trained) in rows.items():
      summary = _record(self.workdir, variant)['summary']
      # The best of the held-out checks at steps 2 and 4 is evaluated; 4 steps trained.
      with open(os.path.join(self.workdir, variant, 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f]
      held_out = {r['step']: r['nll_iwae'] for r in lines if r['split'] == 'holdout'}
      self.assertEqual(sorted(held_out), [2, 4])
      self.assertEqual((evaluated, trained), (min(held_out, key=held_out.get), 4))
      self.assertEqual((summary['evaluated_step'], summary['trained_steps']), (evaluated, 4))
      self.assertAlmostEqual(summary['nll_iwae'], nll, delta=0.005)
      self.assertAlmostEqual(summary['nll_iwae_stderr'], nll_se, delta=0.005)
      self.assertAlmostEqual(summary['nll_authors_4'], authors, delta=0.005)
      self.assertAlmostEqual(summary['nll_authors_4_stderr'], authors_se, delta=0.005)
    with Image.open(os.path.join(self.workdir, ablation.PLOT_FILE)) as im:
      self.assertEqual((im.format, im.size), ('PNG', (800, 480)))

  def test_each_variant_flips_exactly_its_switches(self):
    reference = traverse_util.flatten_dict(_record(self.workdir, 'reference')['config'], sep='.')
    for variant in VARIANTS[1:]:
      config = traverse_util.flatten_dict(_record(self.workdir, variant)['config'], sep='.')
      changed = {k: v for k, v in config.items() if reference[k] != v}
      expected = {k: v for k, v in ablation.VARIANTS[variant][1].items() if reference[k] != v}
      self.assertEqual(changed, expected)
      self.assertNotEmpty(changed)

  def test_stage2_variants_share_the_reference_prior(self):
    prior = lambda v: os.path.join(self.workdir, v, 'prior')
    # Every checkpoint file (config.json records the run's whole config).
    files = lambda v: sorted(
      os.path.relpath(os.path.join(root, name), prior(v))
      for root, _, names in os.walk(prior(v))
      for name in names
      if name != 'config.json'
    )
    self.assertEqual(files('reference'), files('no_prior_input_gradient'))
    for name in files('reference'):
      self.assertTrue(
        filecmp.cmp(
          os.path.join(prior('reference'), name),
          os.path.join(prior('no_prior_input_gradient'), name),
          shallow=False,
        ),
        name,
      )
    self.assertTrue(
      filecmp.cmp(
        os.path.join(self.workdir, 'reference', 'parses.npz'),
        os.path.join(self.workdir, 'no_prior_input_gradient', 'parses.npz'),
        shallow=False,
      )
    )

  def test_rerun_reads_results_back(self):
    metrics = os.path.join(self.workdir, 'no_prior_input_gradient', 'metrics.jsonl')
    mtime = os.path.getmtime(metrics)
    variants = ablation.parse_variants(list(VARIANTS))
    self.assertEqual(ablation.run(self.config, self.workdir, variants), self.table)
    self.assertEqual(os.path.getmtime(metrics), mtime)

  def test_only_stage2_variants_share_the_upstream(self):
    # Other networks need their own prior; the other switches act in stage 2 only.
    for variant in ablation.VARIANTS:
      shares = ablation.shares_upstream(ablation.variant_config(self.config, variant), self.config)
      self.assertEqual(shares, variant != 'our_networks', variant)

  def test_unknown_variant_is_a_usage_error(self):
    with self.assertRaisesRegex(app.UsageError, 'our_netwroks'):
      ablation.parse_variants(['our_netwroks'])
    self.assertEqual(ablation.parse_variants(['our_networks'])[0], 'reference')


if __name__ == '__main__':
  absltest.main()
