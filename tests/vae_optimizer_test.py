"""Stage 2's optimizer against Adam's first step worked out by hand.

Adam's first step is lr * g / (|g| + eps) (both moments are their first value
after bias correction); AdamW (vae.weight_decay > 0) also subtracts
lr * weight_decay * the parameter. The encoder trains at vae.lr, the decoder at
a tenth of it, the frozen prior not at all.
"""

import numpy as np
from absl.testing import absltest, parameterized

from configs import tiny
from npdraw_jax.stages import train_vae

_EPS = 1e-8  # optax.adam's default.


class OptimizerTest(parameterized.TestCase):
  @parameterized.parameters(0.0, 0.5)
  def test_first_step(self, weight_decay):
    config = tiny.get_config()
    config.vae.lr = 0.01
    config.vae.weight_decay = weight_decay
    rng = np.random.default_rng(0)
    params = {
      name: {'w': rng.normal(size=(3, 4)).astype(np.float32)}
      for name in ('encoder', 'decoder', 'prior')
    }
    grads = {name: {'w': rng.normal(size=(3, 4)).astype(np.float32)} for name in params}
    tx = train_vae.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name, lr in (('encoder', 0.01), ('decoder', 0.001), ('prior', 0.0)):
      g, p = grads[name]['w'], params[name]['w']
      expected = -lr * (g / (np.abs(g) + _EPS) + weight_decay * p)
      np.testing.assert_allclose(updates[name]['w'], expected, rtol=1e-4, atol=1e-9, err_msg=name)


if __name__ == '__main__':
  absltest.main()
