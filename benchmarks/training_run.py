"""A timed MNIST training run on the embedded digits, written down in RESULTS.md.

  python -m benchmarks.training_run [--steps=2000] [--workdir=DIR] [--config=FILE]
      [--config.FIELD=V ...]

Runs the whole pipeline (`python -m experiments.mnist`) at the MNIST reference
configuration (the authors' networks at full width) on the 5,000 embedded
digits, with `--steps` prior and stage-2 steps and the held-out selection of
configs/mnist_cpu.py, then appends its wall time per stage and the logged test
bounds to benchmarks/RESULTS.md. --config=FILE (another configuration) and
--config.FIELD=V flags pass through.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import results

_STEPS = flags.DEFINE_integer('steps', 2000, 'Prior and stage-2 training steps.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: a fresh temporary one).')
_RESULTS = flags.DEFINE_string('results', results.RESULTS_FILE, 'Markdown file to append to.')

# The reference configuration on the embedded digits, evaluated as the CPU-scale one is.
EMBEDDED = (
  '--config.data.source=embedded',
  '--config.data.holdout_size=500',
  '--config.vae.holdout_iwae_samples=5',
  '--config.eval.batch_size=100',
  '--config.eval.iwae_samples=(1,10,100)',
  '--config.eval.chunk_size=25',
  '--config.eval.authors_samples=50',
)


def _clock(line: str) -> float:
  """Seconds since midnight of an absl log line ('I1201 21:57:27.169 ...')."""
  hours, minutes, seconds = line.split()[1].split(':')
  return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def stage_seconds(log: str) -> dict[str, float]:
  """Seconds from each '=== Stage NAME ===' log line to the next stage's (the
  last stage: to the launcher's 'Done:' line)."""
  marks = []
  for line in log.splitlines():
    if '=== Stage ' in line:
      marks.append((line.split('=== Stage ')[1].split(' ===')[0], _clock(line)))
    elif '] Done: ' in line:
      marks.append(('done', _clock(line)))
  return {name: end - start for (name, start), (_, end) in zip(marks, marks[1:], strict=False)}


def main(argv):
  passed = [a for a in argv[1:] if a.startswith('--config')]  # --config=FILE too.
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='npdraw_training_run_')
  config_file = [a for a in passed if a.startswith('--config=')]  # Before any override.
  command = [
    sys.executable,
    '-m',
    'experiments.mnist',
    f'--workdir={workdir}',
    *config_file,
    f'--config.prior.train_steps={_STEPS.value}',
    f'--config.vae.train_steps={_STEPS.value}',
    # A field given twice keeps its first value: the passed ones replace these.
    *(a for a in EMBEDDED if a.split('=')[0] not in {p.split('=')[0] for p in passed}),
    *(a for a in passed if a not in config_file),
  ]
  start = time.perf_counter()
  run = subprocess.run(command, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  sys.stderr.write(run.stderr[-5000:])
  if run.returncode:
    raise SystemExit(f'The training run failed with status {run.returncode}.')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  final = [r for r in records if r['stage'] == 'eval'][-1]
  authors = next(k for k in final if k.startswith('nll_authors_') and not k.endswith('_stderr'))
  stages = stage_seconds(run.stderr)
  lines = [
    f'Command: `python -m benchmarks.training_run --steps={_STEPS.value} {" ".join(passed)}`',
    '',
    f'{config_file[0].split("=", 1)[1] if config_file else "The MNIST reference configuration"}'
    f' on the 5,000 embedded digits, {_STEPS.value} prior '
    f'and {_STEPS.value} stage-2 steps; whole pipeline {seconds:.0f} s (stage seconds: '
    + ', '.join(f'{k} {v:.0f}' for k, v in stages.items())
    + ').',
    '',
    f'| test images | nll_iwae (S) | stderr | elbo | {authors} |',
    '|---|---|---|---|---|',
    f'| {final["test_images"]:.0f} | {final["nll_iwae"]:.2f} ({final["iwae_samples"]:.0f}) '
    f'| {final["nll_iwae_stderr"]:.2f} | {final["elbo"]:.2f} | {final[authors]:.2f} |',
  ]
  print(results.append_section('Training run', lines, _RESULTS.value))


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
