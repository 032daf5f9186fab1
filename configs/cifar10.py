"""CIFAR-10, reference settings (32x32x3, K=200, p=s=4, T=64, mixture of logistics).

python -m experiments.cifar10 --workdir=/tmp/npdraw_cifar10
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10 as is: colour, 8-bit likelihood, fully convolutional encoder head."""
  config = default.get_config(arg)
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.canvas_size = 32
  config.data.channels = 3
  config.data.binarize = 'none'
  config.partbank.empty_threshold = 0.0  # Off for colour data.
  config.model.K = 200
  config.model.patch_size = 4
  config.model.location_stride = 4
  config.model.T = 64
  config.model.likelihood = 'mixture_logistic'
  config.model.encoder_head = 'fcn'
  config.parse.threshold = 0.0  # Colour images: draw at every location.
  config.prior.lr = 1e-3
  config.vae.batch_size = 150
  config.vae.epochs = 500
  config.vae.teacher_forcing_decay = 0.01
  config.vae.lambda_sup = 500.0
  config.eval.batch_size = 150
  config.eval.fid_binarize = False
  return config
