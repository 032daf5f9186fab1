"""Seconds-scale sizes for tests and demos: 16x16 embedded digits, K=16, T=16.

python -m experiments.mnist --workdir=/tmp/npdraw_tiny --config=configs/tiny.py
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MNIST (or, with arg 'celeba', CelebA) pipeline shrunk to seconds on a CPU."""
  if arg not in (None, '', 'mnist', 'celeba'):
    raise ValueError(f"configs/tiny.py takes 'mnist' or 'celeba', not {arg!r}.")
  config = default.get_config()
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
  config.prior.head_dim = 8
  config.prior.mlp_dim = 64
  config.prior.batch_size = 32
  config.prior.warmup_steps = 5
  config.prior.train_steps = 20
  config.prior.log_every = 5
  config.prior.eval_every = 10
  config.prior.checkpoint_every = 10
  config.prior.num_samples = 4
  config.data.holdout_size = 64
  config.vae.batch_size = 32
  config.vae.train_steps = 20
  config.vae.holdout_iwae_samples = 2
  config.vae.log_every = 5
  config.vae.checkpoint_every = 10
  config.baseline.hidden = 32
  config.baseline.batch_size = 32
  config.baseline.train_steps = 20
  config.eval.batch_size = 64
  config.eval.iwae_samples = (1, 4)
  config.eval.chunk_size = 2
  config.eval.num_pictures = 8
  config.eval.authors_samples = 4
  if arg == 'celeba':
    _shrink_celeba(config)
  return config


def _shrink_celeba(config: ml_collections.ConfigDict) -> None:
  """CelebA's structure (crop, half-size canvas, colour) at toy sizes."""
  config.data.dataset = 'celeb_a'
  config.data.source = 'tfds'
  config.data.image_size = 16
  config.data.canvas_size = 8
  config.data.channels = 3
  config.data.center_crop = 148
  config.data.binarize = 'none'
  config.eval.fid_binarize = False  # Colour: as configs/celeba.py.
  config.partbank.empty_threshold = 0.0
  config.data.holdout_size = 16  # Of the 64 images tfds' mock data makes.
  config.model.K = 8
  config.model.T = 4
  config.model.likelihood = 'logistic'
  config.model.encoder_head = 'fcn'
  config.parse.threshold = 0.0
  config.vae.beta = 0.0
  config.vae.lambda_sup = 500.0
