#!/usr/bin/env bash
# The accelerator check: on a GPU or TPU host with the package installed
# (pip install -e . plus the accelerator's jax, e.g. 'jax[cuda12]' or 'jax[tpu]'),
# in under 14 minutes (the parts' time limits, 270 + 240 + 300 s), appends to
# benchmarks/RESULTS.md:
#   - the stage-2 and prior steps at the reference configurations in float32
#     and bfloat16 (images/s, achieved FLOP/s against a matmul timed in the run),
#     and in both kernel forms, 'cpu' against 'plain' (what model.kernels = 'auto'
#     picks on this backend rests on it);
#   - a 2,000-step MNIST training run on the embedded digits, to a logged NLL.
# Usage: bash benchmarks/accelerator_check.sh [--quick]
#   --quick: a dry run of the script anywhere (a CPU too): small sizes, 20 steps,
#   results into a temporary file instead of RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
quick=()
steps=2000
dry_eval=()
results=benchmarks/RESULTS.md
if [[ "${1:-}" == --quick ]]; then
  quick=(--quick)
  steps=20
  results=$(mktemp --suffix=.md)
  # The reference at CPU scale (configs/mnist_cpu.py), a small eval.
  dry_eval=(--config=configs/mnist_cpu.py --config.eval.iwae_samples='(1,2)'
    --config.eval.authors_samples=2)
elif python -c 'import jax, sys; sys.exit(jax.default_backend() != "cpu")'; then
  echo "accelerator_check: JAX sees only a CPU; install the accelerator's jax first." >&2
  exit 2
fi
python -c 'import jax; print("devices:", jax.devices())'
# Each part has its own time limit, so that one slow part cannot take the rest's time.
timeout 270 python -m benchmarks.run "${quick[@]}" --only=stage2,prior,dtype --results="$results"
timeout 240 python -m benchmarks.run "${quick[@]}" --only=kernels --results="$results"
timeout 300 python -m benchmarks.training_run --steps="$steps" --results="$results" "${dry_eval[@]}"
echo "accelerator_check: results appended to $results"
