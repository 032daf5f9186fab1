"""flax's nn.Dropout with its mask drawn in a kernels form (platform_kernels.dropout_keep_mask).

Both forms give nn.Dropout's masks bit for bit under the same rng, so models
and checkpoints are the same in either.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from npdraw_jax.model import platform_kernels


class Dropout(nn.Module):
  """nn.Dropout(rate) without broadcast dimensions: the same mask for the same rng.

  Named like flax's layer so that an auto-named instance (Dropout_0, ...) draws
  the rng that nn.Dropout drew in its place.
  """

  rate: float
  deterministic: bool | None = None
  kernels: str = 'cpu'  # How the mask is drawn: platform_kernels.FORMS.

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    rng = self.make_rng('dropout')
    keep = platform_kernels.dropout_keep_mask(rng, keep_prob, inputs.shape, self.kernels)
    return lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))
