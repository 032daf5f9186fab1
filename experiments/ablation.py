"""Ablation on the embedded digits: the authors' setting against single switches.

  python -m experiments.ablation --workdir=DIR [--config=configs/ablation.py]
      [--variants=reference,our_networks,...] [--config.FIELD=VALUE ...]

Each variant is the reference configuration (the authors' networks and stage
2, docs/model.md, section 11, at the step budget of configs/ablation.py, stage 2
stopping early on its held-out bound) with one switch flipped (VARIANTS).
Every variant runs NP-DRAW's stages in DIR/<variant>; a variant that changes
only stage-2 settings starts from a copy of the reference's part bank, parses
and prior, so all of them compare stage-2 choices on the same prior. Each run
is recorded once (results.json, experiments/study.py): a rerun skips finished
variants and resumes an interrupted one. DIR/ablation.md holds the table,
DIR/ablation.png the plot.
"""

import os
import shutil
import time

import jax
import ml_collections
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import config_flags

import configs
from configs import mnist_cpu
from experiments import launch, study
from npdraw_jax import stages
from npdraw_jax.infra import run_dir
from npdraw_jax.model import canvas
from npdraw_jax.stages import bank_parse, train_prior

TABLE_FILE = 'ablation.md'
PLOT_FILE = 'ablation.png'
REFERENCE = 'reference'
# Variant -> (what it changes, config overrides).
VARIANTS = {
  REFERENCE: ("the authors' networks and stage 2 (section 11)", {}),
  'our_networks': (
    'our encoder, decoder and prior at the same CPU scale',
    mnist_cpu.OUR_NETWORKS,
  ),
  'our_teacher_forcing': (
    'teacher forcing exp(-d e), also forcing pres',
    {'vae.teacher_forcing': 'exponential', 'vae.teacher_forcing_pres': True},
  ),
  'no_prior_input_gradient': (
    "no KL gradient through the prior's input history",
    {'vae.kl_through_history': False},
  ),
  'straight_through_where': (
    'straight-through reconstruction gradient for where',
    {'vae.where_gradient': 'straight_through'},
  ),
}
PLOT_SIZE = (8.0, 4.8)  # Inches at PLOT_DPI.
PLOT_DPI = 100


def parse_variants(names: list[str]) -> tuple[str, ...]:
  """--variants checked against VARIANTS; the reference always runs first."""
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f'Unknown variants {unknown}; variants: {",".join(VARIANTS)}.')
  return (REFERENCE, *[n for n in VARIANTS if n in names and n != REFERENCE])


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """A copy of config with the variant's overrides."""
  return mnist_cpu.override(config, VARIANTS[variant][1])


def shares_upstream(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict):
  """Whether two configurations make the same bank, parses and prior."""
  grid = canvas.grid_from_config(config)
  return (
    bank_parse.parse_settings(config) == bank_parse.parse_settings(reference)
    and train_prior.checkpoint_settings(config, grid.num_locations)
    == train_prior.checkpoint_settings(reference, grid.num_locations)
    and config.prior.to_dict() == reference.prior.to_dict()
  )


def copy_upstream(source: str, directory: str) -> None:
  """Starts directory from source's part bank, parses and trained prior."""
  if os.path.exists(os.path.join(directory, 'prior')) or jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  for name in run_dir.BEFORE_VAE:
    if os.path.exists(os.path.join(source, name)):
      shutil.copy2(os.path.join(source, name), os.path.join(directory, name))
  shutil.copytree(os.path.join(source, 'prior'), os.path.join(directory, 'prior'))
  logging.info('Copied the bank, parses and prior of %s into %s.', source, directory)


def run_variant(config: ml_collections.ConfigDict, directory: str) -> dict:
  """NP-DRAW's stages with each one timed; the record's 'summary' is eval's."""
  seconds = {}
  for name in study.NPDRAW_STAGES:
    logging.info('--- NP-DRAW stage %s ---', name)
    start = time.perf_counter()
    summary = stages.STAGES[name](config, directory)
    seconds[name] = time.perf_counter() - start
  return {'summary': summary, 'stage_seconds': seconds}


def _cell(summary: dict, name: str) -> str:
  return f'{summary[name]:.2f} ± {summary[name + "_stderr"]:.2f}'


def format_table(config: ml_collections.ConfigDict, records: dict[str, dict]) -> str:
  """The markdown report of the finished variants."""
  summary = records[REFERENCE]['summary']
  authors = f'nll_authors_{config.eval.authors_samples}'
  largest = max(config.eval.iwae_samples)
  lines = [
    "# Ablation: the authors' NP-DRAW against single switches",
    '',
    f'Embedded MNIST digits ({summary["test_images"]} test images), '
    f'{config.prior.train_steps} prior steps of {config.prior.batch_size} images and stage 2 '
    f'for {study.training_length(config.vae.train_steps, config.vae.patience)} of '
    f'{config.vae.batch_size} images, for every variant; '
    f'{study.evaluated_checkpoint_text(config.data.holdout_size)}. `nll_iwae`: the '
    f"importance-weighted bound on -log p(x) with S = {largest}; `{authors}`: the authors' "
    'estimate (not a bound); nats per image, mean ± standard error over the test split; '
    "lower is better. Stage-2 steps: the evaluated checkpoint's step / the steps trained.",
    '',
    f'| variant | what changes | nll_iwae (S = {largest}) | {authors} | ELBO bound | '
    'stage 2 (min) | stage-2 steps |',
    '|---|---|---:|---:|---:|---:|---:|',
  ]
  for name, record in records.items():
    s = record['summary']
    lines.append(
      f'| `{name}` | {VARIANTS[name][0]} | {_cell(s, "nll_iwae")} | {_cell(s, authors)} | '
      f'{_cell(s, "elbo")} | {record["stage_seconds"]["vae"] / 60:.1f} | '
      f'{study.steps_cell(s)} |'
    )
  return '\n'.join(lines) + '\n'


def save_plot(path: str, config: ml_collections.ConfigDict, records: dict[str, dict]) -> None:
  """nll_iwae and the authors' estimate per variant, with standard-error bars."""
  fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
  ax = fig.add_subplot()
  names = list(records)
  authors = f'nll_authors_{config.eval.authors_samples}'
  for offset, metric, label in (
    (-0.2, 'nll_iwae', f'nll_iwae (S = {max(config.eval.iwae_samples)})'),
    (0.2, authors, f'{authors} (not a bound)'),
  ):
    ax.bar(
      [i + offset for i in range(len(names))],
      [records[n]['summary'][metric] for n in names],
      width=0.4,
      yerr=[records[n]['summary'][metric + '_stderr'] for n in names],
      capsize=4,
      label=label,
    )
  values = [records[n]['summary'][m] for n in names for m in ('nll_iwae', authors)]
  ax.set_ylim(min(values) - 10, max(values) + 5)
  ax.set_xticks(range(len(names)), [n.replace('_', '\n') for n in names])
  ax.set_ylabel('test nats per image (lower is better)')
  ax.grid(axis='y', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=PLOT_DPI)


def run(config: ml_collections.ConfigDict, workdir: str, variants: tuple[str, ...]) -> str:
  """Runs (or loads) each variant; writes the table and the plot; returns the table."""
  records = {}
  for i, name in enumerate(variants):
    logging.info('=== Variant %s (%d of %d) ===', name, i + 1, len(variants))
    run_config = variant_config(config, name)
    directory = os.path.join(workdir, name)
    if name != REFERENCE and shares_upstream(run_config, config):
      copy_upstream(os.path.join(workdir, REFERENCE), directory)
    records[name] = study.run_once(name, run_config, directory, run_variant)
  table = format_table(config, records)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, TABLE_FILE), 'w') as f:
      f.write(table)
    save_plot(os.path.join(workdir, PLOT_FILE), config, records)
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  variants = parse_variants(flags.FLAGS.variants)
  config = flags.FLAGS.config
  study.run_study(
    config,
    os.path.abspath(flags.FLAGS.workdir),
    lambda workdir: run(config, workdir, variants),
    f'{TABLE_FILE} and {PLOT_FILE}',
  )


def define_flags():
  config_flags.DEFINE_config_file(
    'config',
    os.path.join(os.path.dirname(configs.__file__), 'ablation.py'),
    'Configuration file.',
    lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'Directory for the runs, the table and the plot.')
  flags.DEFINE_list('variants', list(VARIANTS), 'Variants to run (the reference always runs).')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  launch.run_app(main, define_flags)
