"""MNIST on the embedded digits, sized to finish within minutes on a 2-core CPU.

The README's main command:

  python -m experiments.mnist --workdir=runs/mnist --config=configs/mnist_demo.py

configs/mnist_cpu.py (the MNIST reference at CPU scale: 600 prior steps, 500
stage-2 steps of 64 images, 500 digits held out) with the settings the
ablation measured best at this budget (README, "Ablation"): our encoder,
decoder and prior (mnist_cpu.OUR_NETWORKS) instead of the authors'.
"""

import ml_collections

from configs import mnist_cpu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CPU-scale reference with the best measured networks."""
  return mnist_cpu.override(mnist_cpu.get_config(arg), mnist_cpu.OUR_NETWORKS)
