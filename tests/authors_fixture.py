"""The authors' small model committed in tests/data/authors_small/, shared by the tests
that read it (convert_authors_test, authors_equivalence_test)."""

import os

import ml_collections

from configs import mnist

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'authors_small')
# The fixture's widths (benchmarks.authors_checkpoint.SMALL_WIDTHS) as our config overrides.
SMALL = {
  'model.encoder_features': 8,
  'model.decoder_features': 8,
  'prior.d_model': 4,
  'prior.num_layers': 1,
}


def small_config(**overrides) -> ml_collections.ConfigDict:
  """Our MNIST reference config at the fixture's widths, with further overrides."""
  config = mnist.get_config()
  for field, value in {**SMALL, **overrides}.items():
    section, name = field.split('.')
    config[section][name] = value
  return config
