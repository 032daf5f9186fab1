"""MNIST on the embedded digits, sized to finish within minutes on a 2-core CPU.

The README's main command:

  python -m experiments.mnist --workdir=runs/mnist --config=configs/mnist_demo.py

Reference structure (28x28, K=50, p=s=5, T=36, raster parses, Bernoulli
likelihood, beta=1, lambda_sup=50) with a smaller prior and networks, smaller
batches and fewer steps than the reference run.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MNIST reference structure at CPU-demo scale."""
  config = default.get_config(arg)
  config.data.source = 'embedded'
  config.model.encoder_features = 32
  config.model.decoder_features = 32
  config.prior.token_features = 8
  config.prior.d_model = 128
  config.prior.num_layers = 2
  config.prior.num_heads = 4
  config.prior.batch_size = 64
  config.prior.lr = 1e-3
  config.prior.warmup_steps = 100
  config.prior.train_steps = 1000
  config.prior.eval_every = 500
  config.prior.checkpoint_every = 500
  config.vae.batch_size = 64
  config.vae.train_steps = 500
  config.vae.checkpoint_every = 250
  config.eval.batch_size = 100
  config.eval.iwae_samples = (1, 10, 100)
  config.eval.chunk_size = 25
  return config
