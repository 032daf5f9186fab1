"""The low-data study on the embedded digits, sized for a 2-core CPU.

  python -m experiments.low_data --workdir=runs/low_data

NP-DRAW as configs/mnist_cpu.py (the MNIST reference structure and the
authors' network family and stage 2, at CPU-demo widths, 500 training digits
held out for model selection) with 600 prior steps and 500 stage-2 steps of
64 images; the baseline VAE (the flax examples' MLP VAE) trains for 4,000
steps of 100 images, where it has nearly converged on the whole split. Both
are evaluated with S = 100.
"""

import ml_collections

from configs import mnist_cpu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """mnist_cpu with step budgets for three fractions and two methods."""
  config = mnist_cpu.get_config(arg)
  config.vae.train_steps = 500
  config.vae.checkpoint_every = 100
  config.baseline.train_steps = 4000
  config.eval.authors_samples = 0
  return config
