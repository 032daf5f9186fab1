"""Omniglot, reference settings (28x28 binary, K=50, p=s=5, T=36).

python -m experiments.omniglot --workdir=/tmp/npdraw_omniglot
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Omniglot: tfds' 105x105 RGB scans become 28x28 binary, strokes = 1."""
  config = default.get_config(arg)
  config.data.dataset = 'omniglot'
  config.data.invert = True  # Strokes are dark on white in the scans.
  config.data.binarize = 'threshold'
  return config
