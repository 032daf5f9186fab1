"""Our stage-2 step against the authors' PyTorch step, timed in turn in one run.

  python -m benchmarks.against_authors --authors_python=/path/to/torch/python \\
      --authors_repo=/path/to/NPDRAW

Each round times, in fresh processes one after the other, the authors' step
(benchmarks/authors_step.py under --authors_python) and ours (the reference
config's compiled step, benchmarks.vae_train) at MNIST batch 64 and CelebA
batch 32 (beta = 0), each the median of --steps steps after warm-up. The
rounds alternate the order, so drift on the machine hits both sides alike.
Appends a section with every median and the ratios to benchmarks/RESULTS.md.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from benchmarks import results

_AUTHORS_PYTHON = flags.DEFINE_string(
  'authors_python', None, "A Python with torch and the authors' imports."
)
_AUTHORS_REPO = flags.DEFINE_string(
  'authors_repo', None, 'A checkout of https://github.com/ZENGXH/NPDRAW.'
)
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternating rounds (each times both sides).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per side and round.')
_SIDE = flags.DEFINE_enum('side', None, ['ours'], 'Internal: time our step alone and print JSON.')
_DATASET = flags.DEFINE_enum('dataset', None, ['mnist', 'celeba'], 'Internal, with --side.')
_RESULTS = flags.DEFINE_string('results', results.RESULTS_FILE, 'Markdown file to append to.')

ROWS = (('mnist', 64), ('celeba', 32))
AUTHORS_STEP = os.path.join(os.path.dirname(__file__), 'authors_step.py')


def _time_ours(dataset: str, batch: int, steps: int) -> dict:
  from benchmarks import vae_train
  from configs import celeba, mnist

  get_config = {'mnist': mnist.get_config, 'celeba': celeba.get_config}[dataset]
  row = vae_train.measure(dataset, get_config, batch, steps, budget_s=None)
  return {'seconds': row['seconds'], 'median_s': row['median_s']}


def _run_json(command: list[str]) -> dict:
  """Runs a timing process; its last stdout line is its JSON result."""
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f'{" ".join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def _commands(dataset: str, batch: int) -> dict[str, list[str]]:
  steps = str(_STEPS.value)
  return {
    'authors': [
      _AUTHORS_PYTHON.value,
      AUTHORS_STEP,
      f'--repo={_AUTHORS_REPO.value}',
      f'--dataset={dataset}',
      f'--batch={batch}',
      f'--steps={steps}',
    ],
    'ours': [
      sys.executable,
      '-m',
      'benchmarks.against_authors',
      '--side=ours',
      f'--dataset={dataset}',
      f'--steps={steps}',
    ],
  }


def _table(medians: dict, torch_version: str) -> list[str]:
  lines = [
    f'Medians of {_STEPS.value} steps per side and round, {_ROUNDS.value} rounds alternating '
    f'the order; fresh process each. Authors: their code (ZENGXH/NPDRAW) under torch '
    f'{torch_version}, {_AUTHORS_PYTHON.value}, via benchmarks/authors_step.py (random prior '
    'weights, bank, parses and images; their flags). Ours: the reference config, '
    'benchmarks.vae_train.',
    '',
    '| row | authors s/step | ours s/step | authors / ours |',
    '|---|---|---|---|',
  ]
  for dataset, batch in ROWS:
    authors, ours = medians[dataset]['authors'], medians[dataset]['ours']
    ratios = [a / o for a, o in zip(authors, ours, strict=True)]
    lines.append(
      f'| {dataset} batch {batch} | {", ".join(f"{a:.3f}" for a in authors)} | '
      f'{", ".join(f"{o:.3f}" for o in ours)} | '
      f'{", ".join(f"{r:.2f}" for r in ratios)} (median {np.median(ratios):.2f}x) |'
    )
  return lines


def main(argv):
  del argv
  if _SIDE.value == 'ours':
    batch = dict(ROWS)[_DATASET.value]
    print(json.dumps(_time_ours(_DATASET.value, batch, _STEPS.value)))
    return
  if not (_AUTHORS_PYTHON.value and _AUTHORS_REPO.value):
    raise app.UsageError('--authors_python and --authors_repo are both needed.')
  medians = {dataset: {'authors': [], 'ours': []} for dataset, _ in ROWS}
  torch_version = None
  try:
    for round_index in range(_ROUNDS.value):
      for dataset, batch in ROWS:
        commands = _commands(dataset, batch)
        order = ('authors', 'ours') if round_index % 2 == 0 else ('ours', 'authors')
        for side in order:
          timed = _run_json(commands[side])
          torch_version = timed.get('torch', torch_version)
          seconds = timed['median_s']
          medians[dataset][side].append(seconds)
          print(f'round {round_index + 1}, {dataset} batch {batch}, {side}: {seconds:.3f} s')
  except KeyboardInterrupt:
    # The table pairs the sides round by round: nothing is appended, the medians so far are shown.
    sys.exit(f'Interrupted: nothing appended to {_RESULTS.value}; medians so far {medians}.')
  title = "Stage-2 step against the authors' PyTorch step, in one run"
  print(results.append_section(title, _table(medians, torch_version), _RESULTS.value))


if __name__ == '__main__':
  app.run(main)
