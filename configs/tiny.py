"""Seconds-scale sizes for tests and demos: 16x16 embedded digits, K=16, T=16.

python -m experiments.mnist --workdir=/tmp/npdraw_tiny --config=configs/tiny.py
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MNIST pipeline shrunk until every stage runs in seconds on a CPU."""
  config = default.get_config(arg)
  config.data.source = 'embedded'
  config.data.image_size = 16
  config.data.canvas_size = 16
  config.partbank.max_patches = 5000
  config.partbank.max_iters = 20
  config.partbank.chunk_size = 1024
  config.model.K = 16
  config.model.patch_size = 4
  config.model.location_stride = 4
  config.model.T = 16
  config.model.encoder_features = 8
  config.model.decoder_features = 8
  config.parse.batch_size = 256
  config.prior.token_features = 4
  config.prior.d_model = 32
  config.prior.num_layers = 2
  config.prior.num_heads = 2
  config.prior.mlp_ratio = 2
  config.prior.batch_size = 32
  config.prior.warmup_steps = 5
  config.prior.train_steps = 20
  config.prior.log_every = 5
  config.prior.eval_every = 10
  config.prior.checkpoint_every = 10
  config.prior.num_samples = 4
  config.vae.batch_size = 32
  config.vae.train_steps = 20
  config.vae.log_every = 5
  config.vae.checkpoint_every = 10
  config.eval.batch_size = 64
  config.eval.iwae_samples = 4
  return config
