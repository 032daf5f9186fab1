"""Our stage-2 step against the authors' on their small model, with their noise.

tests/data/authors_small/ (the release, outputs.npz and equivalence.npz) was written once by
  python -m benchmarks.authors_equivalence_torch --authors_repo=NPDRAW --dataset=mnist \
      --small --batch=2 --scenarios=forced_mixed_pres,free_mixed_pres --compact \
      --out=tests/data/authors_small --network_outputs=tests/data/authors_small/outputs.npz \
      --network_batch=1
with torch and the authors' code (ZENGXH/NPDRAW 7355066): their MNIST model at reduced
widths with random weights and batch statistics in their release layout, and in
equivalence.npz, per scenario, their training step (compute_elbo and step_iter's loss,
train-mode batch norm, prior in eval mode) on two images with noise drawn by the harness
and injected into their gumbel_softmax and torch.bernoulli: the parse, the noise, and what
their step computed (float32). Here the release is converted by npdraw_jax.convert_authors
and our npdraw.encode + npdraw.stage2_terms run on the same images, parse and noise. No
torch here.

Tolerances: max |ours - theirs| / max |theirs|, 1e-5 for forward values (float32 round-off
through these networks summed in another order, XLA against oneDNN, stays below 2e-6);
1e-4 for the KL (their KLD_stp adds eps = 1e-6 inside its logs, ours does not: 2e-5 at
MNIST) and for parameter gradients (sums over the batch and through batch statistics).
"""

import os

import authors_fixture
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import traverse_util

from benchmarks import authors_equivalence
from npdraw_jax import convert_authors
from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import npdraw

SCENARIOS = ('forced_mixed_pres', 'free_mixed_pres')
FORWARD_TOLERANCE = 1e-5
KL_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-4


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, -3, -1)


class Stage2StepTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.release = convert_authors.read_release(authors_fixture.FIXTURE)
    config = authors_fixture.small_config()
    config.vae.prior_dropout = False  # Their prior runs in eval mode in the stored step.
    convert_authors.check_config(cls.release, config)
    cls.config = config
    cls.model = npdraw.make_model(config)
    cls.variables = convert_authors.convert_variables(cls.release.state, cls.model)
    cls.bank = jnp.asarray(convert_authors.read_part_bank(cls.release.prior_dir, config))
    cls.weights = npdraw.LossWeights.from_config(config.vae)
    with np.load(os.path.join(authors_fixture.FIXTURE, 'equivalence.npz')) as f:
      cls.theirs = dict(f)
    cls._steps = {}

  def _our_step(self, scenario: str):
    """Our loss, q's logits, the terms and the parameter gradients (once per scenario)."""
    if scenario in self._steps:
      return self._steps[scenario]
    model, weights, bank = self.model, self.weights, self.bank
    batch, noise, tau, rho = authors_equivalence.their_inputs(self.theirs, scenario)
    stats = self.variables['batch_stats']

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': stats}
      q, _ = npdraw.encode(model, variables, batch['image'], train=True)
      terms, _ = npdraw.stage2_terms(model, variables, bank, batch, q, noise, tau, rho, weights)
      per_example = terms.recon + weights.lambda_sup * terms.sup + weights.beta * terms.kl
      return jnp.mean(per_example), (q, terms)

    (loss, (q, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(self.variables['params'])
    self._steps[scenario] = loss, q, terms, grads
    return self._steps[scenario]

  @parameterized.parameters(*SCENARIOS)
  def test_forward_matches_theirs(self, scenario):
    saved = lambda key: self.theirs[f'{scenario}/{key}']
    self.assertGreater(self.weights.beta, 0)  # Their MNIST loss holds the KL.
    loss, q, terms, _ = self._our_step(scenario)
    latents = terms.latents
    np.testing.assert_array_equal(latents.pres, saved('sampled_pres'))
    # Their prior's input: every step's canvas before it and its location map.
    canvases, maps = canvas_lib.render_relaxed_steps(
      self.model.grid,
      self.bank,
      latents.pres,
      latents.where,
      latents.what,
      self.weights.where_gradient == 'straight_through',
      self.model.prior.history,
    )
    history = jnp.concatenate(canvas_lib.states_before(canvases, maps), axis=-1)
    their_history = saved('prior_history')
    prior_output, parts = saved('prior_output'), self.config.model.K
    rows = {
      'enc_pres': (q['pres'], saved('enc_pres'), FORWARD_TOLERANCE),
      'canvas': (terms.canvas, nhwc(saved('canvas')), FORWARD_TOLERANCE),
      'prior_history': (
        history,
        nhwc(their_history.reshape(*latents.pres.shape, *their_history.shape[1:])),
        FORWARD_TOLERANCE,
      ),
      'prior_what': (terms.prior_logits['what'], prior_output[..., :parts], FORWARD_TOLERANCE),
      'prior_where': (
        terms.prior_logits['where'],
        prior_output[..., parts:-1],
        FORWARD_TOLERANCE,
      ),
      'prior_pres': (
        jax.nn.sigmoid(terms.prior_logits['pres']),
        prior_output[..., -1],
        FORWARD_TOLERANCE,
      ),
      'recon': (terms.recon, saved('recon'), FORWARD_TOLERANCE),
      'kl': (terms.kl, saved('kl'), KL_TOLERANCE),
      'sup': (
        terms.sup,
        saved('loc_loss') + saved('sel_loss') + saved('stp_loss'),
        FORWARD_TOLERANCE,
      ),
      'loss': (loss, saved('loss'), FORWARD_TOLERANCE),
    }
    for name, (ours, theirs, tolerance) in rows.items():
      self.assertLess(relative_error(ours, theirs), tolerance, name)

  @parameterized.parameters(*SCENARIOS)
  def test_decoder_output_gradient_matches_theirs(self, scenario):
    _, _, terms, _ = self._our_step(scenario)
    decoder = self.model.decoder
    net = {
      'params': self.variables['params']['decoder'],
      'batch_stats': self.variables['batch_stats']['decoder'],
    }
    images = jnp.asarray(self.theirs['images'])

    def recon_of_raw(raw):  # MNIST's Bernoulli logits: no scale conversion.
      return jnp.mean(npdraw.reconstruction_loss(self.model, raw, images))

    raw, _ = decoder.apply(net, terms.canvas, train=True, mutable=['batch_stats'])
    theirs = nhwc(self.theirs[f'{scenario}/decoder_raw_grad'])
    self.assertLess(relative_error(jax.grad(recon_of_raw)(raw), theirs), FORWARD_TOLERANCE)

  @parameterized.parameters(*SCENARIOS)
  def test_parameter_gradients_match_theirs(self, scenario):
    *_, grads = self._our_step(scenario)
    prefix = f'{scenario}/grad.'
    saved = {k[len(prefix) :]: v for k, v in self.theirs.items() if k.startswith(prefix)}
    self.assertTrue(any(name.startswith('encoder.') for name in saved))
    self.assertTrue(any(name.startswith('decoder.') for name in saved))
    # Their gradients (and, to know which of ours they cover, ones) in our variables:
    # every map of the converter moves entries without mixing them.
    state = self.release.state
    as_ours = lambda pick: convert_authors.convert_variables(
      {name: pick(name, value) for name, value in state.items()}, self.model
    )['params']
    theirs = as_ours(lambda n, v: saved[n] if n in saved else np.zeros_like(v))
    covered = as_ours(lambda n, v: np.full_like(v, n in saved))
    flat = lambda tree: traverse_util.flatten_dict(tree, sep='/')
    ours, theirs, covered = flat(grads), flat(theirs), flat(covered)
    compared = [path for path, value in covered.items() if np.all(value == 1)]
    self.assertLen(compared, len(saved))
    largest = max(float(np.abs(theirs[path]).max()) for path in compared)
    for path in compared:
      if np.abs(theirs[path]).max() <= 1e-4 * largest:
        # Biases of convolutions that a training-mode batch norm follows: the batch mean
        # removes them, so their gradient is round-off on either side.
        self.assertLess(float(np.abs(ours[path]).max()), 1e-4 * largest, path)
        continue
      self.assertLess(relative_error(ours[path], theirs[path]), GRADIENT_TOLERANCE, path)


if __name__ == '__main__':
  absltest.main()
