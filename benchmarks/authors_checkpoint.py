"""An experiment folder in the NP-DRAW authors' release layout, with random weights.

Run it with a Python that has torch and the authors' other imports (see
benchmarks/authors_step.py), not with npdraw-jax's environment:

  python -m benchmarks.authors_checkpoint --authors_repo=/path/to/NPDRAW \
      --dataset=mnist --out=/tmp/authors_mnist [--small] [--outputs=FILE.npz]

Their code (a checkout of https://github.com/ZENGXH/NPDRAW) builds their
stage-2 model CatVaryLocAT from the flags of their training scripts, with their
own prior loader; every weight and every BatchNorm running mean and variance is
then drawn at random (so that eval-mode outputs test the statistics too), and
the folder is written as their release unzips:

  OUT/exp/<data>/cat_vloc_at/0208/<name>/E<epoch>.pth   torch.save of {model,
      optim, cfg (their yacs CfgNode), test_loss, epo, best_epo}, the prior
      inside as prior_model.*
  OUT/exp/cnn_prior/<data>/0208/<name>/  prior.pt, cfg.yml, patch_bank.npy
      (0..255, as the loader divides by 255 when the maximum exceeds 1) and
      float_matrix.npy

The stage-2 cfg names the prior by the relative path their scripts use
(prior_weight exp/cnn_prior/...). --small builds narrower networks (see
SMALL_WIDTHS) for a test fixture; --outputs also writes, for fixed inputs, what
their networks compute in eval mode (encoder logits, decoder outputs, prior
logits) and a few sums of the saved tensors as torch reads them.

The functions are meant to be imported too (benchmarks/authors_equivalence.py):
build_release() returns their model, its cfg and the written paths;
network_outputs() runs their networks on given inputs.
"""

import argparse
import dataclasses
import glob
import os
import sys

import numpy as np
import torch
import yaml

from benchmarks.authors_step import (
  PRIOR_FLAGS,
  SCRIPT_FLAGS,
  _residual_forward,
  _stack_as_in_torch_1_6,
  their_prior,
)

# Flags of their scripts/train_cifar.sh that differ from the CelebA script's
# (the rest are the same), and of their Omniglot run (the MNIST script's flags
# with their Omniglot dataset; README: exp/omni/cat_vloc_at/.../p5s5n36...).
DATASET_FLAGS = {
  'mnist': SCRIPT_FLAGS['mnist'],
  'omniglot': {**SCRIPT_FLAGS['mnist'], 'dataset': 'omni'},
  'cifar10': {**SCRIPT_FLAGS['celeba'], 'dataset': 'cifarcm', 'kld_weight': 1},
  'celeba': SCRIPT_FLAGS['celeba'],
}
# Their name of each dataset in the release's folders (exp/cnn_prior/<name>).
PRIOR_FOLDER_NAME = {
  'mnist': 'mnist',
  'omniglot': 'omni',
  'cifar10': 'cifar',
  'celeba': 'celebac32',
}
CANVAS_SIZE = {'mnist': 28, 'omniglot': 28, 'cifar10': 32, 'celeba': 32}
PARSED_IMAGES = 4  # Rows of the parse table their loader insists on reading (deleted after).


@dataclasses.dataclass(frozen=True)
class Widths:
  """The sizes their flags leave free: encoder/decoder channels, prior width and depth.

  The prior's MLP stays 2048 wide: their prior builds its reference token CNN
  only at vit_mlp_dim = 2048. Heads (16 of 64) follow from that too.
  """

  hidden: int = 128  # enc_hid = dec_hid.
  prior_width: int = 64  # hidden_size_prior.
  prior_depth: int = 8  # vit_depth.


REFERENCE_WIDTHS = Widths()
SMALL_WIDTHS = Widths(hidden=8, prior_width=4, prior_depth=1)


def import_their_code(repo: str) -> None:
  """Puts their checkout on sys.path and applies authors_step's two shims for today's torch."""
  repo = os.path.abspath(repo)
  if not os.path.isfile(os.path.join(repo, 'model', 'vary_loc_at.py')):
    raise SystemExit(
      f'--authors_repo={repo}: no model/vary_loc_at.py, not a ZENGXH/NPDRAW checkout.'
    )
  if repo not in sys.path:
    sys.path.insert(0, repo)
  if not getattr(torch.stack, '_npdraw_shim', False):
    torch.stack = _stack_as_in_torch_1_6(torch.stack)
    torch.stack._npdraw_shim = True
  from model import modules

  modules.Residual.forward = _residual_forward
  from loguru import logger

  logger.remove()  # Their model logs at every build.


def location_table(dataset: str, flags: dict) -> np.ndarray:
  """[1, L, 2] the centre (row, col) of each candidate patch position, raster order."""
  stride, patch = flags['vary_loc_vae.loc_stride'], flags['ww']
  side = -(-CANVAS_SIZE[dataset] // stride)
  centres = np.arange(side) * stride + patch / 2
  rows, cols = np.meshgrid(centres, centres, indexing='ij')
  return np.stack([rows.ravel(), cols.ravel()], -1)[None].astype(np.float32)


def write_prior_folder(directory: str, dataset: str, widths: Widths, rng) -> None:
  """cfg.yml, patch_bank.npy, float_matrix.npy and the parse cache their loader reads."""
  flags = DATASET_FLAGS[dataset]
  os.makedirs(directory, exist_ok=True)
  steps, parts, patch = flags['vary_loc_vae.nloc'], flags['K'], flags['ww']
  channels = flags['cat_vae.canvas_dim']
  table = location_table(dataset, flags)
  np.save(os.path.join(directory, 'float_matrix.npy'), table)
  # Grey levels 0..255 (float), as their bank files hold; their loader divides by 255.
  bank = np.round(rng.random((parts, patch, patch, channels)) * 255).astype(np.float32)
  np.save(os.path.join(directory, 'patch_bank.npy'), bank)
  # The parse table [N, T, 5] their loader reads; the release has none (deleted later).
  for split in ('train', 'eval'):
    gt = np.zeros((PARSED_IMAGES, steps, 5))
    centred = CANVAS_SIZE[dataset] // 2 - patch // 2
    np.save(os.path.join(directory, f'cached_gt{split}_gt_{steps}-{centred}-1-0.npy'), gt)
  prior_flags = dict(
    PRIOR_FLAGS,
    nloc=steps,
    k=parts,
    pw=patch,
    inputd=channels + 1,
    hidden_size_prior=widths.prior_width,
    vit_depth=widths.prior_depth,
    num_layers=widths.prior_depth,
  )
  with open(os.path.join(directory, 'cfg.yml'), 'w') as f:
    yaml.safe_dump(prior_flags, f)


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Every parameter ~ N(0, 1 / fan_in) (vectors: N(0, 0.1^2) around their init),
  every BatchNorm running mean ~ N(0, 0.1^2) and running variance ~ U(0.5, 1.5)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name in ('temp', 'temp_init'):
        continue  # Their Gumbel temperature, kept as it is.
      if param.dim() >= 2:
        fan_in = param[0].numel()  # in * k * k of a conv, in of a linear
        param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
      else:
        param.add_(0.1 * torch.randn(param.shape, generator=generator))
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))


@dataclasses.dataclass
class Release:
  """What build_release made: their model (eval mode), its cfg and the written files."""

  model: torch.nn.Module
  cfg: object
  checkpoint: str  # The stage-2 .pth.
  prior_dir: str  # The folder holding prior.pt.
  root: str  # The folder holding exp/.


def build_release(
  repo: str,
  dataset: str,
  out: str,
  widths: Widths = REFERENCE_WIDTHS,
  seed: int = 0,
  epoch: int = 550,
) -> Release:
  """Builds their model at random weights and writes it in their release layout under `out`."""
  import_their_code(repo)
  from config import cfg as default_cfg
  from model.vary_loc_at import CatVaryLocAT

  flags = DATASET_FLAGS[dataset]
  rng = np.random.default_rng(seed)
  run_name = f'random_seed{seed}_h{widths.hidden}_p{widths.prior_width}x{widths.prior_depth}'
  prior_rel = os.path.join('exp', 'cnn_prior', PRIOR_FOLDER_NAME[dataset], '0208', run_name)
  prior_dir = os.path.join(out, prior_rel)
  write_prior_folder(prior_dir, dataset, widths, rng)
  prior_path = os.path.join(prior_dir, 'prior.pt')
  # Their loader builds the prior from cfg.yml and loads prior.pt strictly: write
  # a first prior.pt from their own class, replaced by the random weights below.
  _write_initial_prior(prior_path, dataset, widths)

  cfg = default_cfg.clone()
  run_flags = dict(
    flags,
    enc_hid=widths.hidden,
    dec_hid=widths.hidden,
    batch_size=8,
    prior_weight=os.path.abspath(prior_path),
    seed=seed,
  )
  cfg.merge_from_list([str(x) for item in run_flags.items() for x in item])
  cfg.distributed = False
  torch.manual_seed(seed)
  model = CatVaryLocAT(cfg)
  model.set_bank(torch.device('cpu'))
  _randomise(model, seed)
  model.eval()

  torch.save(model.prior_model.state_dict(), prior_path)
  for cached in glob.glob(os.path.join(prior_dir, 'cached_gt*')):
    os.remove(cached)
  cfg.prior_weight = os.path.join(prior_rel, 'prior.pt')  # As their scripts pass it.
  cfg.exp_name = os.path.join('0208', run_name)
  experiment = os.path.join(out, 'exp', flags['dataset'], 'cat_vloc_at', '0208', run_name)
  os.makedirs(experiment, exist_ok=True)
  checkpoint = os.path.join(experiment, f'E{epoch:05d}.pth')
  optimizer = model.get_optim(cfg.lr)
  torch.save(
    {
      'model': model.state_dict(),
      'optim': optimizer.state_dict(),
      'cfg': cfg,
      'test_loss': 123.25,
      'epo': epoch,
      'best_epo': epoch - 1,
    },
    checkpoint,
  )
  return Release(model, cfg, checkpoint, prior_dir, out)


def _write_initial_prior(path: str, dataset: str, widths: Widths) -> None:
  """A prior.pt of their CNNHead at these widths, so that their strict loader accepts it."""
  flags = DATASET_FLAGS[dataset]
  prior = their_prior(
    flags['cat_vae.canvas_dim'],
    flags['K'],
    location_table(dataset, flags).shape[1],
    widths.prior_width,
    widths.prior_depth,
    CANVAS_SIZE[dataset],
    flags['vary_loc_vae.nloc'],
  )
  torch.save(prior.state_dict(), path)


# --- Their networks on given inputs -----------------------------------------------


def fixed_inputs(model, batch: int, seed: int) -> dict[str, np.ndarray]:
  """Inputs in our layouts (NHWC): images, canvases, and prior histories.

  images [B, H, W, C] (binary for Bernoulli data, k/255 otherwise); canvas
  [B, Hc, Wc, C] in [0, 1]; prior_canvases [B, T, Hc, Wc, C] and prior_maps
  [B, T, Hc, Wc, 1] the states before each step.
  """
  rng = np.random.default_rng(seed)
  side, channels, canvas = model.img_size, model.imgd, model.canvas_size
  images = rng.random((batch, side, side, channels), dtype=np.float32)
  if model.out_dist == 'bernoulli':
    images = (images < 0.3).astype(np.float32)
  else:
    images = (np.round(images * 255) / 255).astype(np.float32)
  steps, depth = model.nloci, model.canvasd
  return {
    'images': images,
    'canvas': rng.random((batch, canvas, canvas, depth), dtype=np.float32),
    # Mostly empty, as early canvases are (and the file compresses).
    'prior_canvases': rng.random((batch, steps, canvas, canvas, depth), dtype=np.float32)
    * (rng.random((batch, steps, canvas, canvas, 1)) < 0.25),
    'prior_maps': (rng.random((batch, steps, canvas, canvas, 1)) < 0.3).astype(np.float32),
  }


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


@torch.no_grad()
def network_outputs(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Their eval-mode networks on `inputs` (fixed_inputs' layout), in their layouts.

  encoder_{what,where,pres}: [B, T, K], [B, T, L], [B, T] logits (pres before
  their sigmoid); decoder: the output conv's channels before any activation or
  view, [B, P, H, W]; prior_{what,where,pres}: [B, T, ...] logits (pres before
  their sigmoid).
  """
  model.eval()
  encoder, batch = model.encoder, inputs['images'].shape[0]
  flat = _nchw(inputs['images']).reshape(batch, -1)  # Their data loaders serve [B, C*H*W].
  hidden = encoder.embed(flat)
  steps = model.nloci
  out = {
    'encoder_what': encoder.head_cls(hidden).reshape(batch, steps, -1),
    'encoder_where': encoder.head_loc(hidden).reshape(batch, steps, -1),
    'encoder_pres': encoder.head_stop[0](hidden).reshape(batch, steps),
  }
  layers = list(model.decoder.generative_pxh)
  x = _nchw(inputs['canvas'])
  for layer in layers:
    if isinstance(layer, torch.nn.Sigmoid):
      break  # Bernoulli: the logits.
    x = layer(x)
    if isinstance(layer, torch.nn.Conv2d) and layer is _output_conv(layers):
      break  # Logistic: before their view and permute.
  out['decoder'] = x

  prior = model.prior_model
  canvases = np.concatenate([inputs['prior_canvases'], inputs['prior_maps']], axis=-1)
  tokens = _nchw(canvases.reshape(-1, *canvases.shape[2:]))
  # CNNHead.forward up to its sigmoid and sampler: token CNN, causal ViT, heads.
  length = canvases.shape[1]
  mask = torch.tril(torch.ones((length + 1, length + 1))).bool()
  mask = mask.view(1, 1, length + 1, length + 1).expand(batch, prior.nheads, -1, -1)
  embedded = prior.enc(prior.preprocess(tokens).view(batch, length, -1), mask)
  logits = prior.compute_q_dist(embedded.reshape(batch * length, -1)).view(batch, length, -1)
  parts = model.categorical_dim
  out.update(
    {
      'prior_what': logits[..., :parts],
      'prior_where': logits[..., parts:-1],
      'prior_pres': logits[..., -1],
    }
  )
  return {name: value.numpy() for name, value in out.items()}


def _output_conv(layers: list) -> torch.nn.Module:
  """The decoder's last convolution: the likelihood's channels."""
  return [layer for layer in layers if isinstance(layer, torch.nn.Conv2d)][-1]


def tensor_checks(checkpoint: str) -> dict[str, np.ndarray]:
  """Sums, shapes and first values of some tensors as torch.load reads them back."""
  loaded = torch.load(checkpoint, map_location='cpu', weights_only=False)
  state = loaded['model']
  names = sorted(state)
  chosen = names[:: max(1, len(names) // 12)] + [n for n in names if 'running_var' in n][:2]
  chosen = sorted(set(chosen))
  return {
    'check_names': np.array(chosen),
    'check_sums': np.array([state[n].double().sum().item() for n in chosen]),
    'check_first': np.array([state[n].reshape(-1)[0].double().item() for n in chosen]),
    'check_shapes': np.array([','.join(map(str, state[n].shape)) for n in chosen]),
    'check_num_tensors': np.array(len(state)),
    'check_epo': np.array(loaded['epo']),
    'check_prior_weight': np.array(loaded['cfg'].prior_weight),
    'check_dataset': np.array(loaded['cfg'].dataset),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--authors_repo', required=True, help='a checkout of ZENGXH/NPDRAW')
  parser.add_argument('--dataset', choices=sorted(DATASET_FLAGS), required=True)
  parser.add_argument('--out', required=True, help='folder to write exp/ into')
  parser.add_argument('--small', action='store_true', help=f'widths {SMALL_WIDTHS}')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--outputs', help='.npz of their outputs on fixed inputs, and checks')
  parser.add_argument('--batch', type=int, default=2, help='inputs in --outputs')
  args = parser.parse_args()
  widths = SMALL_WIDTHS if args.small else REFERENCE_WIDTHS
  release = build_release(args.authors_repo, args.dataset, args.out, widths, args.seed)
  print(f'Wrote {release.checkpoint} and {release.prior_dir}.')
  if args.outputs:
    inputs = fixed_inputs(release.model, args.batch, args.seed + 1)
    outputs = network_outputs(release.model, inputs)
    checks = tensor_checks(release.checkpoint)
    np.savez_compressed(args.outputs, **inputs, **outputs, **checks)
    print(f'Wrote {args.outputs}.')


if __name__ == '__main__':
  main()
