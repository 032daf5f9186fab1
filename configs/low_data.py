"""The low-data study on the embedded digits, sized for a 2-core CPU (hours).

  python -m experiments.low_data --workdir=runs/low_data
  python -m experiments.low_data --workdir=runs/low_data_demo --config=configs/low_data.py:demo
  python -m experiments.low_data --workdir=runs/low_data_recommended \
      --config=configs/low_data.py:recommended

NP-DRAW as configs/mnist_cpu.py (the MNIST reference structure and the
authors' network family and stage 2, at CPU-demo widths, 500 training digits
held out for model selection) with 600 prior steps; stage 2 (64 images a
step) and the baseline VAE (the flax examples' MLP VAE, 100 images a step)
each train until their bound on the held-out digits has not improved for
their patience, under a step cap, and are evaluated at their best held-out
checkpoint with S = 100. The baseline's cap is five times the 4,000 steps where
it had nearly converged on the whole split; NP-DRAW's is four times the 500
steps of earlier runs, which had not converged. With the argument 'demo'
NP-DRAW is the README main command's configuration (configs/mnist_demo.py: our
networks and conventions) under the same caps and patiences; with
'recommended', that configuration with the levers measured to help
(benchmarks/RESULTS.md, "Levers"): the prior trained to its best on the
held-out images' parses too, and weight decay in stage 2.
"""

import ml_collections

from configs import mnist_cpu, mnist_demo


def recommended_config() -> ml_collections.ConfigDict:
  """mnist_demo with the prior stopped at its best held-out NLL (on 200 digits
  it overfits its parses within a few hundred steps) and weight decay on the
  encoder and decoder."""
  config = mnist_demo.get_config()
  config.prior.eval_every = 50
  config.prior.patience = 100
  config.vae.weight_decay = 1.0
  return config


VARIANTS = {
  None: mnist_cpu.get_config,  # The reference: the authors' networks and conventions.
  'demo': mnist_demo.get_config,  # The main command's: our networks and conventions.
  'recommended': recommended_config,  # The demo's with the levers that helped.
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """mnist_cpu (or a VARIANTS configuration) with step caps and patiences for
  three fractions and two methods."""
  if arg not in VARIANTS:
    choices = ', '.join(f'"{name}"' for name in VARIANTS if name)
    raise ValueError(f'configs/low_data.py:{arg}: choose no argument or one of {choices}.')
  config = VARIANTS[arg]()
  config.vae.train_steps = 2000  # The cap.
  config.vae.checkpoint_every = 100  # The held-out check.
  config.vae.patience = 500
  config.baseline.train_steps = 20_000
  config.baseline.checkpoint_every = 250
  config.baseline.patience = 2000
  config.eval.authors_samples = 0
  return config
