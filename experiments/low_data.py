"""The low-data study (docs/model.md, section 9): NP-DRAW against a plain VAE trained on
fractions of the training split, compared by their test NLL bound.

  python -m experiments.low_data --workdir=DIR [--config=configs/low_data.py]
      [--fractions=0.05,0.2,1.0] [--config.FIELD=VALUE ...]

For each fraction f (data.train_fraction = f: one seeded subset, seen by every
stage; the test split is whole):
- NP-DRAW runs the stages bank, parse, prior, vae and eval in DIR/npdraw/fraction_f;
- the baseline VAE (npdraw_jax.baseline_vae: the flax examples' MLP VAE with
  its own optimizer) trains and is evaluated in DIR/vae/fraction_f, for up to
  baseline.train_steps steps of baseline.batch_size images. NP-DRAW's stage 2
  trains for up to vae.train_steps steps and its prior on the parses for
  prior.train_steps more. With vae.patience and baseline.patience each stops
  early once its held-out bound has not improved for that many steps; each is
  evaluated at its best held-out checkpoint. The table states the budgets and,
  per run, the evaluated step and the steps trained.
Each run ends by writing results.json (its summary and configuration); a run
whose results.json holds the current configuration is skipped, and an
interrupted one resumes from its artifacts and checkpoints. Finally
DIR/low_data.md holds the table and DIR/low_data.png the plot.
"""

import os

import jax
import ml_collections
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import config_flags

import configs
from experiments import launch, study
from npdraw_jax import baseline_vae
from npdraw_jax.infra import input_pipeline
from npdraw_jax.stages import train_vae

RESULTS_FILE = study.RESULTS_FILE
TABLE_FILE = 'low_data.md'
PLOT_FILE = 'low_data.png'
# Method -> its name in the table and plot.
METHODS = {'npdraw': 'NP-DRAW', 'vae': 'VAE'}
PLOT_SIZE = (6.4, 4.8)  # Inches at PLOT_DPI: 640 x 480 pixels.
PLOT_DPI = 100


def parse_fractions(values: list[str]) -> tuple[float, ...]:
  """--fractions as sorted distinct floats in (0, 1]; a usage error otherwise."""
  try:
    fractions = sorted({float(v) for v in values})
  except ValueError as e:
    raise app.UsageError(f'--fractions must be numbers, got {",".join(values)}.') from e
  if not fractions or not all(0 < f <= 1 for f in fractions):
    raise app.UsageError(f'--fractions must be in (0, 1], got {",".join(values)}.')
  return tuple(fractions)


def fraction_config(config: ml_collections.ConfigDict, fraction: float):
  """A copy of config training on `fraction` of the training split."""
  config = config.copy_and_resolve_references()
  config.data.train_fraction = fraction
  return config


def run_dir(workdir: str, method: str, fraction: float) -> str:
  """DIR/<method>/fraction_<f>, e.g. DIR/vae/fraction_0.05."""
  return os.path.join(workdir, method, f'fraction_{fraction:g}')


def _run_baseline(config: ml_collections.ConfigDict, directory: str) -> dict[str, float]:
  """The baseline's training, then its evaluation summary."""
  baseline_vae.train_and_evaluate(config, directory)
  return baseline_vae.run_eval(config, directory)


_RUNNERS = {'npdraw': study.run_npdraw, 'vae': _run_baseline}


def run_method(method: str, config: ml_collections.ConfigDict, directory: str) -> dict:
  """Trains and evaluates one method under config in directory, or loads its results.

  Returns the record of directory/results.json (study.run_once): 'method',
  'fraction', 'train_examples', 'max_steps' (the cap), 'summary' (the
  evaluation's, with 'trained_steps' and 'evaluated_step'), 'seconds' and
  'config'.
  """

  def run_fn(config, directory):
    summary = _RUNNERS[method](config, directory)
    train_examples = input_pipeline.load_split(config.data, 'train').num_examples
    if method == 'vae':
      max_steps = config.baseline.train_steps
    else:
      max_steps = train_vae.num_train_steps(config, train_examples)
    return {
      'method': method,
      'fraction': config.data.train_fraction,
      'train_examples': train_examples,
      'max_steps': max_steps,
      'summary': summary,
    }

  return study.run_once(method, config, directory, run_fn)


def _cell(summary: dict) -> str:
  return f'{summary["nll_iwae"]:.2f} ± {summary["nll_iwae_stderr"]:.2f}'


def format_table(config: ml_collections.ConfigDict, rows: list[dict[str, dict]]) -> str:
  """The markdown report; rows hold one {method: record} per fraction."""
  first = rows[0]['npdraw']
  npdraw_length = study.training_length(first['max_steps'], config.vae.patience)
  vae_length = study.training_length(rows[0]['vae']['max_steps'], config.baseline.patience)
  prior_length = study.training_length(
    config.prior.train_steps, config.prior.patience, 'the NLL of the held-out parses'
  )
  lines = [
    '# Low-data study: NP-DRAW and a plain VAE',
    '',
    f'Test `nll_iwae` in nats: the importance-weighted bound on -log p(x) with '
    f'S = {first["summary"]["iwae_samples"]} samples, mean ± standard error over the '
    'test split (lower is better). Both models train on the same subset of the '
    f'training split: NP-DRAW its encoder and decoder for {npdraw_length}, '
    f'{config.vae.batch_size} images a step (stage 2), after its prior on the parses for '
    f'{prior_length} (stage 1); the VAE for {vae_length}, '
    f'{config.baseline.batch_size} images a step, with Adam at {config.baseline.lr:g}; '
    f'for each, {study.evaluated_checkpoint_text(config.data.holdout_size)}. "Steps": '
    "the evaluated checkpoint's step / the steps trained. VAE: the flax examples' MLP VAE, "
    f'one hidden layer of {config.baseline.hidden} ReLU units each way, Gaussian latents '
    f'of {config.baseline.latent_dim} dimensions, the same pixel likelihood. "Minutes": the '
    'wall-clock of the run that finished it (all stages, evaluation included).',
    '',
    f'| fraction | training images | {METHODS["npdraw"]} nll_iwae | {METHODS["vae"]} nll_iwae | '
    f'{METHODS["npdraw"]} steps | {METHODS["vae"]} steps | {METHODS["npdraw"]} minutes | '
    f'{METHODS["vae"]} minutes |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for row in rows:
    npdraw, vae = row['npdraw']['summary'], row['vae']['summary']
    lines.append(
      f'| {row["npdraw"]["fraction"]:g} | {row["npdraw"]["train_examples"]} | '
      f'{_cell(npdraw)} | {_cell(vae)} | {study.steps_cell(npdraw)} | '
      f'{study.steps_cell(vae)} | {row["npdraw"]["seconds"] / 60:.1f} | '
      f'{row["vae"]["seconds"] / 60:.1f} |'
    )
  return '\n'.join(lines) + '\n'


def save_plot(path: str, rows: list[dict[str, dict]]) -> None:
  """nll_iwae against the fraction (log axis) with standard-error bars, one line per method."""
  fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
  ax = fig.add_subplot()
  fractions = [row['npdraw']['fraction'] for row in rows]
  for method, label in METHODS.items():
    ax.errorbar(
      fractions,
      [row[method]['summary']['nll_iwae'] for row in rows],
      yerr=[row[method]['summary']['nll_iwae_stderr'] for row in rows],
      marker='o',
      capsize=4,
      label=label,
    )
  ax.set_xscale('log')
  ax.set_xticks(fractions, [f'{f:g}' for f in fractions])
  ax.minorticks_off()
  ax.set_xlabel('fraction of the training split')
  ax.set_ylabel('test nll_iwae (nats)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=PLOT_DPI)


def run(config: ml_collections.ConfigDict, workdir: str, fractions: tuple[float, ...]) -> str:
  """Runs (or loads) both methods at each fraction; writes the table and plot; returns the table."""
  rows = []
  for i, fraction in enumerate(fractions):
    run_config = fraction_config(config, fraction)
    row = {}
    for method, label in METHODS.items():
      logging.info('=== %s, fraction %g (%d of %d) ===', label, fraction, i + 1, len(fractions))
      row[method] = run_method(method, run_config, run_dir(workdir, method, fraction))
    rows.append(row)
  table = format_table(config, rows)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, TABLE_FILE), 'w') as f:
      f.write(table)
    save_plot(os.path.join(workdir, PLOT_FILE), rows)
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  fractions = parse_fractions(flags.FLAGS.fractions)
  config = flags.FLAGS.config
  study.run_study(
    config,
    os.path.abspath(flags.FLAGS.workdir),
    lambda workdir: run(config, workdir, fractions),
    f'{TABLE_FILE} and {PLOT_FILE}',
  )


def define_flags():
  config_flags.DEFINE_config_file(
    'config',
    os.path.join(os.path.dirname(configs.__file__), 'low_data.py'),
    'Configuration file.',
    lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'Directory for the runs, the table and the plot.')
  flags.DEFINE_list('fractions', ['0.05', '0.2', '1.0'], 'Shares of the training split.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  launch.run_app(main, define_flags)
