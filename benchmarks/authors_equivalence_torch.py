"""The authors' stage-2 forward and backward with injected noise: the torch side of
benchmarks/authors_equivalence.py.

Run it with a Python that has torch and the authors' imports (see
benchmarks/authors_step.py), not with npdraw-jax's environment:

  python -m benchmarks.authors_equivalence_torch --authors_repo=/path/to/NPDRAW \
      --dataset=mnist --out=/tmp/equivalence_mnist [--batch=4]

It builds their CatVaryLocAT at their reference flags with random weights and
random BatchNorm statistics (benchmarks/authors_checkpoint.build_release),
writes it in their release layout under --out, then runs their training step's
forward (their compute_elbo and the loss of their step_iter) and backward on
fixed inputs, once per scenario (SCENARIOS), from the saved weights each time.

Their randomness is replaced, in this process only, by arrays drawn here with
NumPy and saved: the Gumbel noise of their gumbel_softmax (model.modules.
sample_gumbel: the part's noise, then the location's), the uniforms behind
their two torch.bernoulli draws of a step (q's pres, then the teacher-forcing
coin; a Bernoulli(p) draw is u < p) and none for their prior's dropout, which
is off (their prior in eval mode, the rest in train mode as their runner sets
it). Their prior's own sampler, whose draws no loss reads, keeps torch's RNG.

Writes --out/equivalence.npz: the images and, per scenario ('<scenario>/<key>'),
the parse, the noise, what their code computed (run_scenario's keys: encoder
logits, latents, canvas, decoder outputs and the gradient of the loss at them,
the decoder's batch-norm and residual outputs, prior history and output, loss
terms), their gradients ('grad.<state_dict name>') and BatchNorm statistics
after the step ('stats.<state_dict name>') of the encoder and decoder.

--small, --scenarios, --compact and --network_outputs write the CI fixture
tests/data/authors_small (the command is in tests/authors_equivalence_test.py).
"""

import argparse
import copy
import functools
import os

import numpy as np
import torch

from benchmarks import authors_checkpoint

# name -> (teacher-forcing coin per example, q's pres, parse, Gumbel temperature).
# coin: 'on' forces every example, 'off' none, 'mixed' every other one; pres:
# 'mixed' leaves about 40% of q's steps undrawn, 'all' draws every step; parse:
# 'undrawn' leaves about 30% of the parse's steps undrawn (pid -1), 'all' none.
SCENARIOS = {
  'free_mixed_pres': ('off', 'mixed', 'undrawn', 1.0),
  'forced_mixed_pres': ('on', 'mixed', 'undrawn', 1.0),
  'forced_all_drawn': ('on', 'all', 'undrawn', 0.7),
  'mixed_forcing_full_parse': ('mixed', 'mixed', 'all', 0.5),
}
FORCING_RATE = 0.5  # Their temp_gt_q: the coin's probability (ours: rho).
UNDRAWN_PRES = 0.4
UNDRAWN_PARSE = 0.3


class _Injected:
  """Queues of arrays that replace their random draws, in the order their step draws."""

  def __init__(self):
    self.gumbel: list[np.ndarray] = []
    self.uniforms: list[np.ndarray] = []

  def install(self) -> None:
    from model import modules

    injected = self
    bernoulli = torch.bernoulli

    def sample_gumbel(shape, eps=1e-20):
      del eps
      if not injected.gumbel:
        raise RuntimeError('Their step drew more Gumbel noise than was injected.')
      noise = injected.gumbel.pop(0)
      if tuple(noise.shape) != tuple(shape):
        raise RuntimeError(f'Injected Gumbel noise {noise.shape} where they draw {tuple(shape)}.')
      return torch.from_numpy(noise)

    def injected_bernoulli(probs, *args, **kwargs):
      if not injected.uniforms:  # Their prior's sampler: its draws reach no loss.
        return bernoulli(probs, *args, **kwargs)
      uniforms = injected.uniforms.pop(0)
      if tuple(uniforms.shape) != tuple(probs.shape):
        raise RuntimeError(f'Injected uniforms {uniforms.shape} where they draw {probs.shape}.')
      return (torch.from_numpy(uniforms) < probs).to(probs.dtype)

    modules.sample_gumbel = sample_gumbel
    torch.bernoulli = injected_bernoulli


def parse_table(model, rng, batch: int, undrawn: float) -> dict[str, np.ndarray]:
  """A parse per image: ours (pres, where, what [B, T]) and theirs ([B, T, 5] prior_gt rows).

  Their row: part id, top-left row and column, and two masks; an undrawn step
  is (-1, -1, -1, 0, 0), as their ph_helper.prepare_gt writes it.
  """
  steps, parts, locations = model.nloci, model.categorical_dim, model.n_class_loc
  pres = rng.random((batch, steps)) >= undrawn
  where = np.where(pres, rng.integers(0, locations, (batch, steps)), 0)
  what = np.where(pres, rng.integers(0, parts, (batch, steps)), 0)
  centres = model.float_matrix[0].numpy()  # [L, 2], the patch centres.
  corners = centres[where] - model.cfg.ww / 2
  table = np.stack([what, corners[..., 0], corners[..., 1], pres, pres], axis=-1).astype(np.float64)
  table[~pres] = (-1, -1, -1, 0, 0)
  return {'parse_pres': pres, 'parse_where': where, 'parse_what': what, 'parse_table': table}


def images_for(model, rng, batch: int) -> np.ndarray:
  """[B, H, W, C] images: binary for Bernoulli data, k / 255 otherwise."""
  side, channels = model.img_size, model.imgd
  images = rng.random((batch, side, side, channels), dtype=np.float32)
  if model.out_dist == 'bernoulli':
    return (images < 0.3).astype(np.float32)
  return (np.round(images * 255) / 255).astype(np.float32)


def _their_input(images: np.ndarray) -> torch.Tensor:
  """Their loaders' [B, C*H*W] (NCHW flattened)."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1)).reshape(len(images), -1))


def pres_uniforms(model, x: torch.Tensor, rng, mode: str) -> np.ndarray:
  """[B, T, 1] uniforms for q's pres draw (u < P(pres)), far from P(pres) so that
  round-off cannot flip a draw: about UNDRAWN_PRES of the steps undrawn, or none."""
  encoder = copy.deepcopy(model.encoder)  # Its batch statistics would move otherwise.
  encoder.train()
  with torch.no_grad():
    hidden = encoder.embed(x)
    probs = encoder.head_stop(hidden).reshape(len(x), model.nloci, 1).double().numpy()
  fraction = rng.uniform(0.05, 0.95, probs.shape)
  if mode == 'all':
    return (probs * fraction).astype(np.float32)
  undrawn = rng.random(probs.shape) < UNDRAWN_PRES
  uniforms = np.where(undrawn, probs + (1 - probs) * fraction, probs * fraction)
  return uniforms.astype(np.float32)


def coin_uniforms(mode: str, batch: int) -> np.ndarray:
  """[B] uniforms for their teacher-forcing coin (forced where u < FORCING_RATE)."""
  forced = {'on': np.ones(batch, bool), 'off': np.zeros(batch, bool)}.get(
    mode, np.arange(batch) % 2 == 0
  )
  return np.where(forced, 0.1, 0.9).astype(np.float32)


def _likelihood_grad64(model, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
  """d mean(their -log p(x | canvas)) / d raw output, all in float64."""
  layers = list(model.decoder.generative_pxh)
  tail = layers[layers.index(authors_checkpoint._output_conv(layers)) + 1 :]
  raw64 = raw.detach().double().requires_grad_()
  pred = raw64
  for layer in tail:  # Their views, permutes and sigmoid after the output conv.
    pred = layer(pred)
  torch.mean(model.compute_recont_loss(pred, x.double(), len(x))).backward()
  return raw64.grad


def _keep_with_grad(seen: dict, name: str, tensor: torch.Tensor) -> None:
  """Records a module's output and keeps its gradient (a hook returning None changes nothing)."""
  tensor.retain_grad()
  seen[name] = tensor


def _finishing_order(layers: list) -> list:
  """The layers in the order their forward passes end (a block after what it holds)."""
  order, pending = [], []
  for layer in layers:
    while pending and not any(layer is m for m in pending[-1].modules()):
      order.append(pending.pop())
    if isinstance(layer, torch.nn.BatchNorm2d):
      order.append(layer)
    else:
      pending.append(layer)
  return order + pending[::-1]


class _Metric:
  """Their MetricLogger's interface, recording nothing."""

  def update(self, **kwargs):
    del kwargs


def run_scenario(model, state, injected, x, table, noise, tau) -> dict[str, np.ndarray]:
  """Their step on x from `state` with the given noise; returns what it computed."""
  from runner.category_vae_runner import aggregate_loss_gs

  model.load_state_dict(state)
  model.train()
  model.prior_model.eval()  # Their prior's dropout off; it has no batch norm.
  model.temp.data.fill_(tau)
  model.temp_gt_q = FORCING_RATE
  batch = x.shape[0]
  from utils import ph_helper

  # Their parse table, also where their teacher forcing reads it (bound in their set_bank).
  model.prior_gt = torch.from_numpy(table)
  model.get_gt_sel_loc = functools.partial(
    ph_helper.get_gt_sel_loc, model.info_dict, model.prior_gt
  )
  xid = torch.arange(batch)
  injected.gumbel = [noise['gumbel_what'].reshape(-1, model.categorical_dim)]
  injected.gumbel.append(noise['gumbel_where'].reshape(-1, model.n_class_loc))
  injected.uniforms = [noise['pres_uniforms'], noise['coin_uniforms']]

  seen = {}
  hooks = [
    model.encoder.head_cls.register_forward_hook(lambda m, i, o: seen.update(enc_what=o)),
    model.encoder.head_loc.register_forward_hook(lambda m, i, o: seen.update(enc_where=o)),
    model.encoder.head_stop[0].register_forward_hook(lambda m, i, o: seen.update(enc_pres=o)),
    authors_checkpoint._output_conv(list(model.decoder.generative_pxh)).register_forward_hook(
      lambda m, i, o: _keep_with_grad(seen, 'decoder_raw', o)
    ),
    model.prior_model.preprocess.register_forward_pre_hook(
      lambda m, i: seen.update(prior_history=i[0])
    ),
  ]
  # The decoder's batch norms and residual blocks, in their order: the inputs of
  # its ReLUs, where round-off can flip a mask (authors_equivalence.py counts them).
  decoder_layers = [
    m
    for m in model.decoder.generative_pxh.modules()
    if isinstance(m, torch.nn.BatchNorm2d) or type(m).__name__ == 'Residual'
  ]
  activations = []
  hooks += [
    m.register_forward_hook(lambda m, i, o: activations.append(o.detach().clone()))
    for m in decoder_layers
  ]
  evaluate = model.prior_model.evaluate

  def recorded_evaluate(prior_input):
    output, sampled = evaluate(prior_input)
    seen['prior_output'] = output
    return output, sampled

  model.prior_model.evaluate = recorded_evaluate
  try:
    model.zero_grad()
    # Their compute_elbo, step by step, then the loss of their step_iter.
    latent_dict = model.encode(x, model.cfg.cat_vae.estimator)
    model.xid = xid
    latent_dict = model.fillq_gt_ifnid(latent_dict)
    pred, canvas, _ = model.decode(latent_dict)
    losses, _ = model.loss_function(pred, x, latent_dict, canvas)
    loss = torch.mean(losses['ELBO']) + aggregate_loss_gs(
      model.cfg.cat_vae, losses, _Metric(), model
    )
    loss.backward()
    if injected.gumbel or injected.uniforms:
      raise RuntimeError('Their step drew less noise than was injected.')
    kl = losses['KLD']
    if model.cfg.kld_weight == 0:
      # Their KL is not in this loss: evaluated alone, to test the prior and the KL all the same.
      model.cfg.kld_weight = 1
      try:
        with torch.no_grad():
          kl = model.compute_KL(latent_dict, canvas)[0]
      finally:
        model.cfg.kld_weight = 0
  finally:
    model.prior_model.evaluate = evaluate
    for hook in hooks:
      hook.remove()

  steps = model.nloci
  out = {
    # Their likelihood's gradient in float64 (their code, on their float32 output):
    # the measure of its own float32 round-off.
    'decoder_raw_grad64': _likelihood_grad64(model, seen['decoder_raw'], x),
    'enc_what': seen['enc_what'].reshape(batch, steps, -1),
    'enc_where': seen['enc_where'].reshape(batch, steps, -1),
    'enc_pres': seen['enc_pres'].reshape(batch, steps),
    'sampled_what': latent_dict['sampled_sel'],
    'sampled_where': latent_dict['sampled_loc'],
    'sampled_pres': latent_dict['sampled_stp'].reshape(batch, steps),
    'canvas': canvas,
    'decoder_raw': seen['decoder_raw'],
    'decoder_raw_grad': seen['decoder_raw'].grad,
    'recon': losses['BCE'],
    'kl': kl,
    'loc_loss': losses['loc_loss'],
    'sel_loss': losses['sel_loss'],
    'stp_loss': losses['stp_loss'],
    'loss': loss,
    'prior_history': seen['prior_history'],
    'prior_output': seen['prior_output'],
  }
  # Residual blocks run after their inner batch norms: the order of modules() is wanted.
  finished = {id(m): a for m, a in zip(_finishing_order(decoder_layers), activations, strict=True)}
  for index, layer in enumerate(decoder_layers):
    kind = 'bn' if isinstance(layer, torch.nn.BatchNorm2d) else 'res'
    out[f'decoder_act.{index:02d}.{kind}'] = finished[id(layer)]
  out = {name: value.detach().double().numpy() for name, value in out.items()}
  for name, param in model.named_parameters():
    if param.grad is not None and not name.startswith('prior_model.'):
      out[f'grad.{name}'] = param.grad.double().numpy()
  for name, buffer in model.named_buffers():
    if 'running_' in name and not name.startswith('prior_model.'):
      out[f'stats.{name}'] = buffer.detach().double().numpy()
  return out


# What a compact run (the CI fixture) keeps of a scenario: its inputs, the loss
# terms and a few of the values behind them, and the gradients.
COMPACT_KEYS = (
  'parse_pres',
  'parse_where',
  'parse_what',
  'gumbel_what',
  'gumbel_where',
  'pres_uniforms',
  'coin_uniforms',
  'tau',
  'rho',
  'enc_pres',
  'sampled_pres',
  'canvas',
  'decoder_raw_grad',
  'prior_history',
  'prior_output',
  'recon',
  'kl',
  'loc_loss',
  'sel_loss',
  'stp_loss',
  'loss',
)


# The gradients a compact run keeps: the decoder's (at the small widths, a few
# thousand entries a tensor), the encoder's pres head's and its last embedding layer's
# (MNIST's encoder; every head's backward goes through it), not the large part and
# location heads'.
COMPACT_GRADIENTS = ('grad.decoder.', 'grad.encoder.head_stop.', 'grad.encoder.embed.15.')


def _compact(scenario: dict) -> dict:
  """COMPACT_KEYS and COMPACT_GRADIENTS, in float32: their step computes in float32, so
  nothing is lost (the float64 recomputation of the likelihood's gradient is left out)."""
  kept = {k: v for k, v in scenario.items() if k in COMPACT_KEYS or k.startswith(COMPACT_GRADIENTS)}
  return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in kept.items()}


def run(
  repo: str,
  dataset: str,
  out: str,
  batch: int,
  seed: int,
  widths: authors_checkpoint.Widths = authors_checkpoint.REFERENCE_WIDTHS,
  scenarios: tuple[str, ...] = tuple(SCENARIOS),
  compact: bool = False,
  network_outputs: str | None = None,
  network_batch: int = 2,
) -> str:
  """Builds and saves their model, runs the scenarios; returns the .npz path.

  compact: keep only what _compact keeps. network_outputs: also write there, first,
  benchmarks/authors_checkpoint's .npz (their eval-mode networks on network_batch
  fixed inputs and checks of the saved tensors), as its --outputs does.
  """
  release = authors_checkpoint.build_release(repo, dataset, out, widths, seed=seed)
  model = release.model
  if network_outputs:
    inputs = authors_checkpoint.fixed_inputs(model, network_batch, seed + 1)
    np.savez_compressed(
      network_outputs,
      **inputs,
      **authors_checkpoint.network_outputs(model, inputs),
      **authors_checkpoint.tensor_checks(release.checkpoint),
    )
  state = copy.deepcopy(model.state_dict())
  injected = _Injected()
  injected.install()
  rng = np.random.default_rng(seed + 1)
  images = images_for(model, rng, batch)
  x = _their_input(images)
  checkpoint = os.path.relpath(release.checkpoint, out)
  saved = {'images': images, 'checkpoint': np.array(checkpoint)}
  steps, parts, locations = model.nloci, model.categorical_dim, model.n_class_loc
  for name in scenarios:
    coin, pres, parse, tau = SCENARIOS[name]
    model.load_state_dict(state)
    table = parse_table(model, rng, batch, UNDRAWN_PARSE if parse == 'undrawn' else 0.0)
    noise = {
      'gumbel_what': rng.gumbel(size=(batch, steps, parts)).astype(np.float32),
      'gumbel_where': rng.gumbel(size=(batch, steps, locations)).astype(np.float32),
      'pres_uniforms': pres_uniforms(model, x, rng, pres),
      'coin_uniforms': coin_uniforms(coin, batch),
    }
    result = run_scenario(model, state, injected, x, table['parse_table'], noise, tau)
    scenario = {**table, **noise, **result, 'tau': np.array(tau), 'rho': np.array(FORCING_RATE)}
    if compact:
      scenario = _compact(scenario)
    saved.update({f'{name}/{key}': value for key, value in scenario.items()})
    print(f'{dataset} {name}: loss {float(result["loss"]):.6g}', flush=True)
  path = os.path.join(out, 'equivalence.npz')
  np.savez_compressed(path, **saved)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--authors_repo', required=True, help='a checkout of ZENGXH/NPDRAW')
  parser.add_argument('--dataset', choices=sorted(authors_checkpoint.DATASET_FLAGS), required=True)
  parser.add_argument('--out', required=True, help='a new folder for their release and the .npz')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--small', action='store_true', help=f'widths {authors_checkpoint.SMALL_WIDTHS}'
  )
  parser.add_argument(
    '--scenarios', default=','.join(SCENARIOS), help=f'comma-separated, of {", ".join(SCENARIOS)}'
  )
  parser.add_argument(
    '--compact', action='store_true', help='keep the inputs, loss terms and gradients, float32'
  )
  parser.add_argument(
    '--network_outputs', help="also write authors_checkpoint's --outputs .npz here"
  )
  parser.add_argument('--network_batch', type=int, default=2, help='inputs in --network_outputs')
  args = parser.parse_args()
  scenarios = tuple(args.scenarios.split(','))
  unknown = set(scenarios) - set(SCENARIOS)
  if unknown:
    parser.error(f'unknown --scenarios {", ".join(sorted(unknown))}')
  widths = authors_checkpoint.SMALL_WIDTHS if args.small else authors_checkpoint.REFERENCE_WIDTHS
  torch.manual_seed(args.seed)
  path = run(
    args.authors_repo,
    args.dataset,
    args.out,
    args.batch,
    args.seed,
    widths,
    scenarios,
    args.compact,
    args.network_outputs,
    args.network_batch,
  )
  print(path)


if __name__ == '__main__':
  main()
