"""The ablation of experiments/ablation.py on the embedded digits (about an hour
on a 2-core CPU).

  python -m experiments.ablation --workdir=runs/ablation

configs/mnist_cpu.py (the MNIST reference structure on the embedded digits,
the authors' network family and stage 2 at demo widths, 500 digits held out)
with a step budget every variant shares: 1,000 prior steps of 64 and 400
stage-2 steps of 64 images, evaluated with S = 100.
"""

import ml_collections

from configs import mnist_cpu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """mnist_cpu with the budget every variant shares."""
  config = mnist_cpu.get_config(arg)
  config.prior.train_steps = 1000
  config.prior.eval_every = 500
  config.prior.checkpoint_every = 500
  config.vae.train_steps = 400
  config.vae.checkpoint_every = 100
  return config
