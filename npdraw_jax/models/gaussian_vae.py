"""The plain VAE of the low-data baseline: Gaussian latents, NP-DRAW's nets.

The encoder is NP-DRAW's CNN body (layers.DownBody) with a dense head giving
the mean and log-variance of q(z | x); the decoder maps z linearly to a
canvas-shaped tensor and runs NP-DRAW's Decoder on it.
"""

import chex
import flax.linen as nn
import jax

from npdraw_jax.models import decoder as decoder_lib
from npdraw_jax.models import layers


class GaussianEncoder(nn.Module):
  """x [B, H, W, C] -> (mean, log_var), each [B, latent_dim]."""

  latent_dim: int
  features: int
  hidden: int = 512  # As NP-DRAW's 'mlp' head.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(x, 4)
    batch = x.shape[0]
    h = layers.DownBody(self.features)(x, train)
    h = nn.relu(nn.Dense(self.hidden)(h.reshape(batch, -1)))
    out = nn.Dense(2 * self.latent_dim)(h)
    chex.assert_shape(out, (batch, 2 * self.latent_dim))
    return out[:, : self.latent_dim], out[:, self.latent_dim :]


class LatentDecoder(nn.Module):
  """z [B, latent_dim] -> likelihood parameters [B, H, W, out_channels]."""

  canvas_size: int
  channels: int
  features: int
  out_channels: int
  upsample: int = 1  # Image side / canvas side, as for NP-DRAW's decoder.

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    chex.assert_rank(z, 2)
    side = self.canvas_size
    canvas = nn.Dense(side * side * self.channels)(z).reshape(-1, side, side, self.channels)
    return decoder_lib.Decoder(
      features=self.features, out_channels=self.out_channels, upsample=self.upsample
    )(canvas, train)


class GaussianVAE(nn.Module):
  """The two nets under the names 'encoder' and 'decoder' (one variable tree).

  Calling the module encodes and decodes the mean (used to initialise both);
  `encode` and `decode` run one net each.
  """

  encoder: GaussianEncoder
  decoder: LatentDecoder

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    mean, _ = self.encoder(x, train)
    return self.decoder(mean, train)

  def encode(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    return self.encoder(x, train)

  def decode(self, z: jax.Array, train: bool) -> jax.Array:
    return self.decoder(z, train)
