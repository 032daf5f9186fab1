"""Our stage-2 step against the authors', component by component, on the same inputs and noise.

  python -m benchmarks.authors_equivalence --authors_python=/path/to/torch/python \\
      --authors_repo=/path/to/NPDRAW [--datasets=mnist,celeba,cifar10]

For each dataset, benchmarks/authors_equivalence_torch.py runs under
--authors_python: their CatVaryLocAT at their reference flags, random weights
and BatchNorm statistics, saved in their release layout, and their training
step's forward and backward with injected noise, for each of its SCENARIOS.
Here their folder is read by npdraw_jax.convert_authors (the weights as our
converter maps them), and our step (npdraw.encode and npdraw.stage2_terms, the
reference configuration with the prior's dropout off, as theirs is) runs on the
same images, parses and noise: their pres uniforms u (drawn where u < P) as
logistic noise log(1 - u) - log(u) (drawn where logit + noise > 0), their
Gumbel noise as is, their coin's uniforms as our forcing uniforms.

Each component's error is max |ours - theirs| / max |theirs| over the batch
(gradients and statistics: the worst tensor), against a stated tolerance.
Their gradients and statistics, keyed by their state_dict names, are mapped
into our variables by the converter itself (every map of it is linear).
Writes the table to benchmarks/RESULTS.md in place of an earlier run's section of the same
title (--results='' only prints it).
"""

import dataclasses
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn
from flax import traverse_util

from benchmarks import results
from npdraw_jax import convert_authors
from npdraw_jax.model import canvas as canvas_lib
from npdraw_jax.model import distributions, npdraw

_AUTHORS_PYTHON = flags.DEFINE_string(
  'authors_python', None, "A Python with torch and the authors' imports."
)
_AUTHORS_REPO = flags.DEFINE_string(
  'authors_repo', None, 'A checkout of https://github.com/ZENGXH/NPDRAW.'
)
_DATASETS = flags.DEFINE_list('datasets', ['mnist', 'celeba', 'cifar10'], 'Reference configs.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Images per scenario.')
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Where their releases are written (default: a temporary folder).'
)
_REUSE = flags.DEFINE_bool(
  'reuse', False, 'Reuse their outputs already in --workdir (no torch run) where present.'
)
_RESULTS = flags.DEFINE_string(
  'results', results.RESULTS_FILE, 'Markdown file to write the section to.'
)

TORCH_SIDE = 'benchmarks.authors_equivalence_torch'
# The torch side's scenarios, in its order (authors_equivalence_torch.SCENARIOS).
SCENARIOS = ('free_mixed_pres', 'forced_mixed_pres', 'forced_all_drawn', 'mixed_forcing_full_parse')

# component -> (what it is, tolerance on max |ours - theirs| / max |theirs|).
# Float32 round-off through a network of this depth, summed in another order
# (XLA against oneDNN), stays below 1e-5 of the largest value forward; the
# backward passes go through batch-norm statistics and the loss's sums of
# thousands of terms, hence the looser gradient tolerance.
COMPONENTS = {
  'enc_what': ("encoder's part logits", 1e-5),
  'enc_where': ("encoder's location logits", 1e-5),
  'enc_pres': ("encoder's pres logits", 1e-5),
  'latent_what': ('sampled (forced) part weights', 1e-5),
  'latent_where': ('sampled (forced) location, one-hot', 1e-6),
  'latent_pres': ("q's pres draws", 0.0),
  'canvas': ("decoder's input canvas", 1e-5),
  'decoder_acts': ("decoder's batch norm and residual outputs (worst)", 1e-5),
  'decoder_raw': ("decoder's output conv, raw", 1e-5),
  'decoder_raw_grad': ("d loss / d decoder's raw output", 1e-5),
  'decoder_raw_grad_f64': (
    "d loss / d decoder's raw output, ours against their float64 recomputation",
    1e-5,
  ),
  'prior_history': ("prior's input history (canvas + location map)", 1e-5),
  'prior_what': ("prior's part logits", 1e-5),
  'prior_where': ("prior's location logits", 1e-5),
  'prior_pres': ("prior's P(pres)", 1e-5),
  'recon': ('-log p(x | canvas) per image', 1e-5),
  'kl': ('KL(q || prior) per image', 1e-4),
  'sup': ('parse supervision per image (pres + where + what)', 1e-5),
  'loss': ("the step's loss", 1e-5),
  'grad_encoder': ('d loss / d encoder params (worst tensor)', 1e-4),
  'grad_decoder': ('d loss / d decoder params (worst tensor)', 1e-4),
  'decoder_backward': (
    "their d loss / d raw output through our decoder's VJP at their canvas (worst tensor)",
    1e-4,
  ),
  'decoder_backward_their_masks': (
    'the same, our batch norm and residual outputs pinned to theirs (their ReLU masks)',
    1e-4,
  ),
  'stats_encoder': ('encoder BatchNorm statistics after the step', 1e-5),
  'stats_decoder': ('decoder BatchNorm statistics after the step', 1e-5),
}


# Rows whose tolerance is at least twice r, their likelihood's own float32 round-off
# (their gradient of it in float32 against float64, on the same output): a
# difference of discretised-logistic CDFs loses most of float32's digits where a
# pixel's bin holds little mass, in their float32 as in ours.
SCALED_BY_ROUND_OFF = ('decoder_raw_grad', 'decoder_raw_grad_f64', 'grad_decoder')

# A tensor whose largest value is below this fraction of its network's largest is
# compared by nothing: the biases of convolutions that a training-mode BatchNorm
# follows, whose gradient is 0 up to round-off (the batch mean removes them).
VANISHING = 1e-4


def run_torch_side(dataset: str, out: str) -> str:
  """Runs their side in a subprocess; returns its .npz."""
  command = [
    _AUTHORS_PYTHON.value,
    '-m',
    TORCH_SIDE,
    f'--authors_repo={_AUTHORS_REPO.value}',
    f'--dataset={dataset}',
    f'--out={out}',
    f'--batch={_BATCH.value}',
  ]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=root)
  if done.returncode:
    raise RuntimeError(f'{" ".join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}')
  return done.stdout.strip().splitlines()[-1]


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if ours.shape != theirs.shape:
    raise ValueError(f'shapes differ: ours {ours.shape}, theirs {theirs.shape}')
  scale = np.max(np.abs(theirs))
  diff = np.max(np.abs(ours - theirs))
  return float(diff / scale) if scale > 0 else float(diff)


def worst_leaf(ours: dict, theirs: dict) -> tuple[float, str]:
  """The largest relative error over the leaves of two trees, and a note: its path, and
  the leaves left out because their true value vanishes (VANISHING)."""
  flat_ours = traverse_util.flatten_dict(ours, sep='/')
  flat_theirs = traverse_util.flatten_dict(theirs, sep='/')
  largest = max(float(np.max(np.abs(v))) for v in flat_theirs.values())
  errors, vanishing = {}, []
  for path, value in flat_theirs.items():
    if float(np.max(np.abs(value))) <= VANISHING * largest:
      vanishing.append(path)
    else:
      errors[path] = relative_error(flat_ours[path], value)
  path = max(errors, key=errors.get)
  note = f'worst {path}'
  if vanishing:
    note += f'; {len(vanishing)} vanishing left out ({", ".join(vanishing[:3])})'
  return errors[path], note


def _nhwc(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, -3, -1)


def _their_tensors_as_ours(state, saved, prefix, model):
  """Their tensors saved as '<prefix>.<state_dict name>' mapped into our variables
  (zeros wherever nothing was saved)."""
  names = {key[len(prefix) + 1 :]: key for key in saved if key.startswith(prefix + '.')}
  filled = {
    name: saved[names[name]].astype(np.float32) if name in names else np.zeros_like(value)
    for name, value in state.items()
  }
  return convert_authors.convert_variables(filled, model)


class Ours:
  """Our model, converted from their release, and our step with their noise."""

  def __init__(self, release_dir: str):
    self.release = convert_authors.read_release(release_dir)
    config = convert_authors.reference_config(self.release.cfg)
    convert_authors.check_config(self.release, config)
    convert_authors.check_location_table(self.release.prior_dir, config)
    config.vae.prior_dropout = False  # Theirs runs with the prior in eval mode here.
    self.config = config
    self.model = npdraw.make_model(config)
    self.variables = convert_authors.convert_variables(self.release.state, self.model)
    self.bank = jnp.asarray(convert_authors.read_part_bank(self.release.prior_dir, config))
    self.weights = npdraw.LossWeights.from_config(config.vae)

  def step(self, images, batch, noise, tau, rho):
    """Loss, gradients and everything compared, for one scenario."""
    model, weights, bank = self.model, self.weights, self.bank
    stats = self.variables['batch_stats']

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': stats}
      q, enc_stats = npdraw.encode(model, variables, images, train=True)
      terms, dec_stats = npdraw.stage2_terms(
        model, variables, bank, batch, q, noise, tau, rho, weights
      )
      per_example = terms.recon + weights.lambda_sup * terms.sup
      if terms.kl is not None:
        per_example = per_example + weights.beta * terms.kl
      return jnp.mean(per_example), (q, terms, {'encoder': enc_stats, 'decoder': dec_stats})

    (loss, (q, terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      self.variables['params']
    )
    # The decoder's raw output (the same call as in the loss, without the scale
    # conversion), and its batch norms' and residual blocks' outputs.
    raw, activations = self.decoder_forward(terms.canvas)

    def recon_of_raw(out):
      if model.likelihood_convention == 'authors':
        out = distributions.from_unit_scale(
          model.likelihood, out, model.channels, model.num_mixtures
        )
      return jnp.mean(npdraw.reconstruction_loss(model, out, images))

    raw_grad = jax.grad(recon_of_raw)(raw)  # Only the likelihood reads the decoder's output.
    kl_terms = terms
    if weights.beta == 0:  # Their KL is then out of the loss too; both evaluated alone.
      kl_terms, _ = npdraw.stage2_terms(
        model,
        self.variables,
        bank,
        batch,
        q,
        noise,
        tau,
        rho,
        dataclasses.replace(weights, beta=1.0),
      )
    latents = terms.latents
    canvases, maps = canvas_lib.render_relaxed_steps(
      model.grid,
      bank,
      latents.pres,
      latents.where,
      latents.what,
      weights.where_gradient == 'straight_through',
      model.prior.history,
    )
    history = jnp.concatenate(canvas_lib.states_before(canvases, maps), axis=-1)
    return {
      'loss': loss,
      'q': q,
      'terms': terms,
      'kl': kl_terms.kl,
      'prior': kl_terms.prior_logits,
      'raw': raw,
      'raw_grad': raw_grad,
      'activations': activations,
      'history': history,
      'grads': grads,
      'stats': new_stats,
    }

  def decoder_forward(self, canvas):
    """The decoder's raw output (train mode, from the converted batch statistics) and its
    batch norms' and residual blocks' outputs by module path."""
    (raw, extra) = self.model.decoder.apply(
      {
        'params': self.variables['params']['decoder'],
        'batch_stats': self.variables['batch_stats']['decoder'],
      },
      canvas,
      train=True,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda module, method: (
        method == '__call__'
        and any(kind in type(module).__name__ for kind in ('BatchNorm', 'AuthorsResBlock'))
      ),
    )
    captured = traverse_util.flatten_dict(extra['intermediates'], sep='/')
    activations = {
      key.removesuffix('/__call__'): value[0]
      for key, value in captured.items()
      if key.endswith('/__call__')
    }
    return raw, activations

  def decoder_backward(self, canvas, cotangent, pinned: dict | None = None) -> dict:
    """d/d decoder params of <cotangent, decoder(canvas)>: our decoder's backward alone,
    in train mode from the converted batch statistics.

    pinned: {module path: value} replaces those batch norm and residual outputs in
    the forward (ours + stop_gradient(value - ours)), so that every ReLU reads
    their value and takes their mask, while the backward stays ours.
    """
    decoder = self.model.decoder
    stats = self.variables['batch_stats']['decoder']

    def pin(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = '/'.join(context.module.path)
      if pinned is None or context.method_name != '__call__' or path not in pinned:
        return out
      return out + jax.lax.stop_gradient(jnp.asarray(pinned[path], out.dtype) - out)

    def raw_of(params):
      with nn.intercept_methods(pin):
        out, _ = decoder.apply(
          {'params': params, 'batch_stats': stats}, canvas, train=True, mutable=['batch_stats']
        )
      return out

    _, backward = jax.vjp(raw_of, self.variables['params']['decoder'])
    return backward(jnp.asarray(cotangent, jnp.float32))[0]


def _decoder_order(path: str) -> tuple:
  """Our decoder's layers in their order: TorchConvBN_0, _1, the residual blocks, the rest."""
  parts = path.split('/')
  index = lambda part: int(part.rsplit('_', 1)[1])
  if parts[0].startswith('AuthorsResBlock'):
    inner = index(parts[1]) if len(parts) > 2 else -1  # Its output first, as torch lists it.
    return (1, index(parts[0]), inner)
  return (0 if index(parts[0]) < 2 else 2, index(parts[0]), 0)


def _feeds_relu(path: str, last_block: str) -> bool:
  """Whether a ReLU reads this output: every batch norm's but a residual branch's last
  (added to the block's input), and every residual block's output but the last's."""
  if path.startswith('AuthorsResBlock'):
    parts = path.split('/')
    return parts[1] == 'TorchConvBN_0' if len(parts) > 2 else parts[0] != last_block
  return True


def their_activations(ours: dict, saved, name: str) -> dict[str, np.ndarray]:
  """Their decoder's batch norm and residual outputs (NHWC) under our module paths, in order."""
  paths = sorted(ours, key=_decoder_order)
  keys = sorted(k for k in saved if k.startswith(f'{name}/decoder_act.'))
  if len(paths) != len(keys):
    raise ValueError(f'Our decoder has {len(paths)} such layers, theirs {len(keys)}.')
  return {path: _nhwc(saved[key]) for path, key in zip(paths, keys, strict=True)}


def compare_activations(ours: dict, saved, name: str) -> tuple[float, str]:
  """The worst relative error over the decoder's batch norm and residual outputs, and
  how many ReLU masks differ (a ReLU whose input is within round-off of 0 takes either
  side: its mask, and every gradient through it, then differ by more than round-off)."""
  paths = list(their_activations(ours, saved, name).items())
  blocks = [p for p, _ in paths if p.startswith('AuthorsResBlock') and p.count('/') == 0]
  worst, flips, total, at = 0.0, 0, 0, []
  for path, theirs in paths:
    mine = np.asarray(ours[path])
    worst = max(worst, relative_error(mine, theirs))
    if _feeds_relu(path, blocks[-1] if blocks else ''):
      flipped = (mine > 0) != (theirs > 0)
      flips += int(flipped.sum())
      total += flipped.size
      at += [f'{x:.1e}' for x in theirs[flipped][:2]]
  note = f'{flips} of {total} ReLU masks differ'
  if flips:
    note += f' (their ReLU inputs there, e.g. {", ".join(at[:4])})'
  return worst, note


def their_inputs(saved, scenario: str) -> tuple[dict, npdraw.Stage2Noise, float, float]:
  """(batch, noise, tau, rho) of one scenario the torch side saved, in our forms.

  saved: equivalence.npz as a mapping ('images' and '{scenario}/{key}' arrays).
  """
  s = lambda key: saved[f'{scenario}/{key}']
  batch = {
    'image': jnp.asarray(saved['images']),
    'pres': jnp.asarray(s('parse_pres')),
    'where': jnp.asarray(s('parse_where'), jnp.int32),
    'what': jnp.asarray(s('parse_what'), jnp.int32),
  }
  uniforms = s('pres_uniforms')[..., 0].astype(np.float64)
  noise = npdraw.Stage2Noise(
    # Theirs draws where u < P; ours where logit + noise > 0: noise = logit(1 - u).
    pres=jnp.asarray(np.log1p(-uniforms) - np.log(uniforms), jnp.float32),
    where=jnp.asarray(s('gumbel_where')),
    what=jnp.asarray(s('gumbel_what')),
    forcing=jnp.asarray(s('coin_uniforms')),
    dropout=jax.random.key(0),  # Unused: the prior's dropout is off on both sides.
  )
  return batch, noise, float(s('tau')), float(s('rho'))


def compare_scenario(ours: Ours, saved, name: str) -> dict[str, tuple[float, str]]:
  """{component: (relative error, note)} for one scenario."""
  s = lambda key: saved[f'{name}/{key}']
  model = ours.model
  batch, noise, tau, rho = their_inputs(saved, name)
  got = ours.step(batch['image'], batch, noise, tau, rho)
  q, terms = got['q'], got['terms']
  batch_size, steps = batch['pres'].shape
  order = convert_authors.output_channel_order(model.likelihood, model.channels, model.num_mixtures)
  prior_output = s('prior_output')
  parts = ours.config.model.K
  history = s('prior_history').reshape(batch_size, steps, *s('prior_history').shape[1:])
  rows = {
    'enc_what': (q['what'], s('enc_what')),
    'enc_where': (q['where'], s('enc_where')),
    'enc_pres': (q['pres'], s('enc_pres')),
    'latent_what': (terms.latents.what, s('sampled_what')),
    'latent_where': (terms.latents.where, s('sampled_where')),
    'latent_pres': (terms.latents.pres, s('sampled_pres')),
    'canvas': (terms.canvas, _nhwc(s('canvas'))),
    'decoder_raw': (got['raw'], _nhwc(s('decoder_raw'))[..., order]),
    'decoder_raw_grad': (got['raw_grad'], _nhwc(s('decoder_raw_grad'))[..., order]),
    'prior_history': (got['history'], _nhwc(history)),
    'prior_what': (got['prior']['what'], prior_output[..., :parts]),
    'prior_where': (got['prior']['where'], prior_output[..., parts:-1]),
    'prior_pres': (jax.nn.sigmoid(got['prior']['pres']), prior_output[..., -1]),
    'recon': (terms.recon, s('recon')),
    'kl': (got['kl'], s('kl')),
    'sup': (terms.sup, s('loc_loss') + s('sel_loss') + s('stp_loss')),
    'loss': (got['loss'], s('loss')),
  }
  out = {key: (relative_error(a, b), '') for key, (a, b) in rows.items()}
  # Their likelihood's own float32 round-off: its gradient against the same in float64.
  their_round_off = relative_error(s('decoder_raw_grad'), s('decoder_raw_grad64'))
  out['decoder_raw_grad'] = (
    out['decoder_raw_grad'][0],
    f'their float32 gradient is {their_round_off:.1e} from their float64 one',
  )
  out['round_off'] = (their_round_off, '')
  ours_raw_grad = np.asarray(got['raw_grad'])
  out['decoder_raw_grad_f64'] = (
    relative_error(ours_raw_grad, _nhwc(s('decoder_raw_grad64'))[..., order]),
    '',
  )
  out['decoder_acts'] = compare_activations(got['activations'], saved, name)
  state = ours.release.state
  their_grads = _their_tensors_as_ours(state, saved, f'{name}/grad', model)['params']
  their_stats = _their_tensors_as_ours(state, saved, f'{name}/stats', model)['batch_stats']
  for net in ('encoder', 'decoder'):
    out[f'grad_{net}'] = worst_leaf(got['grads'][net], their_grads[net])
    out[f'stats_{net}'] = worst_leaf(got['stats'][net], their_stats[net])
  # The decoder's backward alone: their cotangent, their canvas, their parameter gradients.
  their_canvas = _nhwc(s('canvas'))
  cotangent = _nhwc(s('decoder_raw_grad'))[..., order]
  error, note = worst_leaf(ours.decoder_backward(their_canvas, cotangent), their_grads['decoder'])
  # Our forward from their canvas can flip other ReLU masks than from ours.
  _, flips = compare_activations(ours.decoder_forward(their_canvas)[1], saved, name)
  out['decoder_backward'] = (error, f'{note}; from their canvas {flips.split(" (")[0]}')
  pinned = their_activations(got['activations'], saved, name)
  out['decoder_backward_their_masks'] = worst_leaf(
    ours.decoder_backward(their_canvas, cotangent, pinned), their_grads['decoder']
  )
  return out


def compare_dataset(dataset: str, workdir: str) -> dict[str, dict[str, tuple[float, str]]]:
  out = os.path.join(workdir, dataset)
  npz = os.path.join(out, 'equivalence.npz')
  if not (_REUSE.value and os.path.isfile(npz)):
    npz = run_torch_side(dataset, out)
  saved = dict(np.load(npz))
  ours = Ours(out)
  return {name: compare_scenario(ours, saved, name) for name in SCENARIOS}


def table(found: dict) -> list[str]:
  lines = [
    'Their CatVaryLocAT (ZENGXH/NPDRAW 7355066, reference flags and widths, random weights '
    'and BatchNorm statistics, via benchmarks/authors_checkpoint.py) saved in their release '
    'layout, read by npdraw_jax.convert_authors; both stage-2 steps (train-mode BatchNorm, '
    'prior dropout off) on the same batch of '
    f'{_BATCH.value} images, parses and noise (benchmarks/authors_equivalence_torch.py '
    'injects it into their gumbel_softmax and torch.bernoulli). Scenarios: '
    "free_mixed_pres (no teacher forcing, ~40% of q's steps undrawn, ~30% of the parse "
    'undrawn, tau 1), forced_mixed_pres (every example forced, same pres and parse), '
    'forced_all_drawn (forced, every q step drawn, tau 0.7), mixed_forcing_full_parse '
    '(every other example forced, parse all drawn, tau 0.5); rho 0.5. Error: '
    'max |ours - theirs| / max |theirs| over the batch (gradients, statistics: worst tensor). '
    'CelebA (beta = 0): the prior and KL rows are evaluated beside the loss, as neither is in it. '
    "r: their likelihood's own float32 round-off, max |their float32 gradient - their float64 "
    'gradient| / max |float64| on the same decoder output (their compute_recont_loss run in '
    'float64 by the torch side). decoder_raw_grad_f64: our float32 likelihood gradient against '
    'that float64 one. decoder_backward: their d loss / d decoder raw output (their float32 '
    "likelihood's, round-off and all) fed as the cotangent into our decoder's VJP (train mode, "
    'the same batch statistics, their canvas), against their decoder parameter gradients: '
    "the network's backward alone; decoder_backward_their_masks: the same with our batch norm "
    'and residual outputs pinned to their values in the forward (ours + stop_gradient(theirs '
    '- ours)), so that every ReLU takes their mask. ReLU masks that differ are counted in Notes.',
    '',
    '| dataset | component | ' + ' | '.join(SCENARIOS) + ' | tolerance | pass |',
    '|---|---|' + '---|' * len(SCENARIOS) + '---|---|',
  ]
  for dataset, per_scenario in found.items():
    for component, (label, tolerance) in COMPONENTS.items():
      errors = [per_scenario[name][component][0] for name in SCENARIOS]
      if component in SCALED_BY_ROUND_OFF:
        bounds = [max(tolerance, 2 * per_scenario[name]['round_off'][0]) for name in SCENARIOS]
        ok = all(e <= b for e, b in zip(errors, bounds, strict=True))
        shown = f'max({tolerance:.0e}, 2 r): {", ".join(f"{b:.0e}" for b in bounds)}'
      else:
        ok = all(e <= tolerance for e in errors)
        shown = f'{tolerance:.0e}'
      cells = ' | '.join(f'{e:.1e}' for e in errors)
      lines.append(
        f'| {dataset} | {component}: {label} | {cells} | {shown} | {"pass" if ok else "**FAIL**"} |'
      )
  notes = []
  for dataset, per_scenario in found.items():
    for component, (_, tolerance) in COMPONENTS.items():
      for name in SCENARIOS:
        error, note = per_scenario[name][component]
        if note and (error > tolerance or component == 'decoder_acts'):
          notes.append(f'- {dataset} {name} {component}: {error:.1e}; {note}')
  if notes:
    lines += ['', 'Notes:', '', *notes]
  return lines


def replace_section(title: str, lines: list[str], path: str) -> str:
  """Appends the section (benchmarks.results.append_section) in place of an earlier run's
  section of the same title, which is removed up to the next '## ' heading."""
  with open(path) as f:
    text = f.read()
  heading = f'\n## {title} ('
  start = text.find(heading)
  if start >= 0:
    end = text.find('\n## ', start + len(heading))
    text = text[: start + 1] + (text[end + 1 :] if end >= 0 else '')
    with open(path, 'w') as f:
      f.write(text.rstrip('\n') + '\n\n')
  return results.append_section(title, lines, path)


def main(argv):
  del argv
  if not (_AUTHORS_PYTHON.value and _AUTHORS_REPO.value):
    raise app.UsageError('--authors_python and --authors_repo are both needed.')
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='authors_equivalence_')
  found = {}
  for dataset in _DATASETS.value:
    found[dataset] = compare_dataset(dataset, workdir)
    for name in SCENARIOS:
      worst = {k: v for k, v in found[dataset][name].items() if v[1]}
      print(dataset, name, {k: f'{v[0]:.2e}' for k, v in found[dataset][name].items()}, worst)
  lines = table(found)
  if _RESULTS.value:
    title = "Stage-2 step against the authors', component by component"
    print(replace_section(title, lines, _RESULTS.value))
  else:
    print('\n'.join(lines))
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
