"""The MNIST reference at CPU scale, on the embedded digits: what the ablation
(configs/ablation.py) and the low-data study (configs/low_data.py) start from.

  python -m experiments.mnist --workdir=runs/mnist_cpu --config=configs/mnist_cpu.py

The MNIST reference (28x28, K=50, p=s=5, T=36, raster parses, Bernoulli
likelihood, beta=1, lambda_sup=50, the authors' network family and stage 2)
with narrower encoder and decoder (64 channels, reference 128), a shallow
prior (2 blocks of 4 heads of 16 and MLP 256, reference 8 blocks of 16 heads
of 64 and MLP 2048), smaller batches and far fewer steps than the reference
run, and 500 of the 4,500 training digits held out for model selection.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MNIST reference structure at CPU scale."""
  config = default.get_config(arg)
  config.data.source = 'embedded'
  config.data.holdout_size = 500
  config.model.encoder_features = 64
  config.model.decoder_features = 64
  config.prior.num_layers = 2
  config.prior.num_heads = 4
  config.prior.head_dim = 16
  config.prior.mlp_dim = 256
  config.prior.lr = 1e-3  # Reference 1e-4, for a run hundreds of times longer.
  config.prior.warmup_steps = 100
  config.prior.train_steps = 600
  config.prior.eval_every = 300
  config.prior.checkpoint_every = 300
  config.vae.batch_size = 64
  config.vae.train_steps = 500
  config.vae.checkpoint_every = 100
  config.vae.holdout_iwae_samples = 5
  config.eval.batch_size = 100
  config.eval.iwae_samples = (1, 10, 100)
  config.eval.chunk_size = 25
  config.eval.authors_samples = 50
  return config


# The project's earlier networks at this scale, before the authors' family
# replaced them (channels 32 and 64, prior of width 128 with 2 blocks): the
# ablation's 'our_networks' switch and part of the demo's settings.
OUR_NETWORKS = {
  'model.networks': 'ours',
  'model.encoder_features': 32,
  'model.decoder_features': 32,
  'prior.token_features': 8,
  'prior.d_model': 128,
  'prior.num_layers': 2,
  'prior.num_heads': 4,
  'prior.head_dim': 0,
  'prior.mlp_dim': 512,
}


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of config with {'section.field': value} overrides."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, field = key.split('.')
    setattr(config[section], field, value)
  return config
