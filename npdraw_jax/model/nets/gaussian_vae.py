"""The plain VAE of the low-data baseline: Gaussian latents, one-hidden-layer MLPs.

As the flax examples' MNIST VAE: the encoder is Dense(hidden) + ReLU on the
flattened image, then dense heads for the mean and log-variance of q(z | x);
the decoder is Dense(hidden) + ReLU on z, then a dense layer giving the pixel
likelihood's parameters.
"""

import chex
import flax.linen as nn
import jax


class MlpEncoder(nn.Module):
  """x [B, H, W, C] -> (mean, log_var), each [B, latent_dim]."""

  hidden: int
  latent_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(x, 4)
    batch = x.shape[0]
    h = nn.relu(nn.Dense(self.hidden, name='hidden')(x.reshape(batch, -1)))
    mean = nn.Dense(self.latent_dim, name='mean')(h)
    log_var = nn.Dense(self.latent_dim, name='log_var')(h)
    chex.assert_shape([mean, log_var], (batch, self.latent_dim))
    return mean, log_var


class MlpDecoder(nn.Module):
  """z [B, latent_dim] -> likelihood parameters [B, height, width, out_channels]."""

  hidden: int
  height: int
  width: int
  out_channels: int  # distributions.num_outputs of the likelihood.

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    chex.assert_rank(z, 2)
    h = nn.relu(nn.Dense(self.hidden, name='hidden')(z))
    out = nn.Dense(self.height * self.width * self.out_channels, name='out')(h)
    return out.reshape(z.shape[0], self.height, self.width, self.out_channels)


class GaussianVAE(nn.Module):
  """The two nets under the names 'encoder' and 'decoder' (one variable tree).

  Calling the module encodes and decodes the mean (used to initialise both);
  `encode` and `decode` run one net each.
  """

  encoder: MlpEncoder
  decoder: MlpDecoder

  def __call__(self, x: jax.Array) -> jax.Array:
    mean, _ = self.encoder(x)
    return self.decoder(mean)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encoder(x)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)
