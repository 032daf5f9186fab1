"""MNIST, reference settings (28x28 binarised dynamically, K=50, p=s=5, T=36).

python -m experiments.mnist --workdir=/tmp/npdraw_mnist
python -m experiments.mnist --workdir=/tmp/npdraw_mnist --config.data.source=embedded
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The defaults are the MNIST reference; kept as its own file for launchers."""
  return default.get_config(arg)
