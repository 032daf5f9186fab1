"""The low-data study on the embedded digits, sized for a 2-core CPU.

  python -m experiments.low_data --workdir=runs/low_data

NP-DRAW as configs/mnist_demo.py (the MNIST reference structure at CPU-demo
scale) with 300 prior steps, 300 VAE steps of 64 images and S up to 25; the
baseline VAE (the flax examples' MLP VAE) trains for 300 steps of 100 images.
The default fractions (0.05, 0.2, 1 of the 4,500 training digits) took 16.3
min in all on the project's 2-core machine (2026-11-29, sharing it with other
jobs; NP-DRAW 4-4.5 min and the earlier, convolutional VAE 1-1.3 min per
fraction).
"""

import ml_collections

from configs import mnist_demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """mnist_demo with step budgets for three fractions and two methods."""
  config = mnist_demo.get_config(arg)
  config.prior.train_steps = 300
  config.prior.eval_every = 150
  config.prior.checkpoint_every = 150
  config.vae.train_steps = 300
  config.vae.checkpoint_every = 150
  config.baseline.train_steps = 300
  config.eval.iwae_samples = (1, 10, 25)
  config.eval.chunk_size = 25
  return config
