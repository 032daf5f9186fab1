"""The ablation of experiments/ablation.py on the embedded digits (hours on a
2-core CPU).

  python -m experiments.ablation --workdir=runs/ablation

configs/mnist_cpu.py (the MNIST reference structure on the embedded digits,
the authors' network family and stage 2 at demo widths, 500 digits held out)
with a step budget every variant shares: 1,000 prior steps of 64; stage 2 on
64 images a step until the held-out bound has not improved for 500 steps,
under a cap of 2,000 steps (earlier runs trained a fixed 400); the best
held-out checkpoint evaluated with S = 100.
"""

import ml_collections

from configs import mnist_cpu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """mnist_cpu with the budget every variant shares."""
  config = mnist_cpu.get_config(arg)
  config.prior.train_steps = 1000
  config.prior.eval_every = 500
  config.prior.checkpoint_every = 500
  config.vae.train_steps = 2000  # The cap.
  config.vae.checkpoint_every = 100  # The held-out check.
  config.vae.patience = 500
  return config
