"""The ablation of experiments/ablation.py on the embedded digits (about an hour
on a 2-core CPU).

  python -m experiments.ablation --workdir=runs/ablation

configs/mnist_demo.py (the MNIST reference structure on the embedded digits,
500 digits held out) with the authors' encoder and decoder at their width
(128 channels) and their stage 2, a shallow prior (as the demo's) and a step
budget every variant shares: 1,000 prior steps, 600 stage-2 steps of 64
images, evaluated with S = 100.
"""

import ml_collections

from configs import mnist_demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """mnist_demo at the authors' encoder and decoder width, with the shared budget."""
  config = mnist_demo.get_config(arg)
  config.model.encoder_features = 128
  config.model.decoder_features = 128
  config.prior.train_steps = 1000
  config.prior.eval_every = 500
  config.prior.checkpoint_every = 500
  config.vae.train_steps = 600
  config.vae.checkpoint_every = 100
  return config
