"""The authors' PyTorch stage-2 training step, timed on this machine's CPU.

Run it with a Python that has torch, torchvision and the authors' other imports
(loguru, yacs, einops, scipy, matplotlib, Pillow, opencv-python-headless, tqdm);
not with npdraw-jax's environment, which has no torch. `benchmarks.against_authors`
runs it in turn with our step, so that the ratio comes from one run.

Their code (a checkout of https://github.com/ZENGXH/NPDRAW, given by --repo) is
used unchanged: their CatVaryLocAT built from the flags of their training
scripts, their frozen ViT prior loaded by their own loader, their optimiser and
their `step_iter`. What their repository does not ship is made here with the
shapes their loader reads, filled at random: the prior's weights (a freshly
initialised prior, saved and loaded back), the part bank, the location table
and the parse supervision. Images are random too (binary for MNIST), so the
step does the work of training, not of a trained model.

Two shims let their code (written for torch 1.6) run on today's torch, with
the same values and the same operations:
- torch.stack returned a contiguous tensor in 1.6; now it keeps its inputs'
  strides and their canvas code fails on a `.view`. It is wrapped to return
  what 1.6 returned (a copy only where the strides differ).
- their residual block applies an in-place ReLU to its input and adds the
  result; today's autograd rejects that where the input is another ReLU's
  output (the decoder). The block's forward is replaced by the same ReLU out
  of place, then the rest of their block.

Prints one JSON line: {"dataset", "batch", "threads", "torch", "seconds": [...],
"median_s"}.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import yaml

# Flags of the authors' scripts/train_{mnist,celeba}.sh that shape the step
# (logging, comet, epochs and paths left out; the batch size is ours to set):
# those both scripts pass alike, then each script's own.
SHARED_FLAGS = {
  'model_name': 'cat_vloc_at',
  'dec_hid': 128,
  'enc_hid': 128,
  'lr': 1e-3,
  'bce_weight': 1,
  'cat_vae.add_stop': 1,
  'cat_vae.estimator': 'gs',
  'cat_vae.hybrid.latent_dz': 0,
  'optim.diff_lr': 1,
  'overlap': 'max',
  'temp_init': 1.0,
  'temp_min': 0.5,
  'temp_anneal_rate': 0.013862944,
  'supervise_latent_loc': 1,
  'supervise_canvas': 0,
  'slide_all': 0,
  'use_patch_bank': 1,
  'use_prior_model': 1,
  'vary_loc_vae.te_sel_gt': 4,
  'vary_loc_vae.post_areg': 0,
  'vary_loc_vae.loc_dist': 'cat',
  'vary_loc_vae.stridep': 2,
}
SCRIPT_FLAGS = {
  'mnist': {
    **SHARED_FLAGS,
    'dataset': 'stoch_mnist',
    'K': 50,
    'wh': 5,
    'ww': 5,
    'kld_weight': 1,
    'cat_vae.canvas_dim': 1,
    'use_patch_bank_prior': 1,
    'vary_loc_vae.te_sel_gt_temp': 0.005,
    'vary_loc_vae.nloc': 36,
    'vary_loc_vae.loc_stride': 5,
    'vary_loc_vae.latent_loc_weight': 50.0,
    'vary_loc_vae.latent_sel_weight': 50.0,
    'vary_loc_vae.latent_stop_weight': 1.0,
  },
  'celeba': {
    **SHARED_FLAGS,
    'dataset': 'celebac32',
    'K': 200,
    'wh': 4,
    'ww': 4,
    'kld_weight': 0,
    'freeze_encoder': 0,
    'img_mean': 0,
    'cat_vae.canvas_dim': 3,
    'vary_loc_vae.enc_version': 2,
    'vary_loc_vae.nloc': 64,
    'vary_loc_vae.loc_stride': 4,
    'vary_loc_vae.anchor_dependent': 0,
    'vary_loc_vae.latent_loc_weight': 500.0,
    'vary_loc_vae.latent_sel_weight': 500.0,
  },
}

# Their prior as docs/model.md, section 11 describes it (prior_config.py keys): a ViT of
# width 64 and depth 8 with MLP 2048 over the token CNN, one head per output.
PRIOR_FLAGS = {
  'model_name': 'cnn_prior',
  'use_vit': 1,
  'use_cnn_process': 1,
  'vit_mlp_dim': 2048,
  'vit_depth': 8,
  'vit_dropout': 1,
  'hidden_size_prior': 64,
  'num_layers': 8,
  'mhead': 1,
  'concat_one_hot': 0,
  'input_id_only': 0,
  'pos_encode': 0,
  'use_emb_enc': 0,
  'mask_out_prevloc_samples': 0,
  'add_stop': 1,
}

CANVAS_SIZE = {'mnist': 28, 'celeba': 32}
TRAINING_IMAGES = 1000  # rows of the random parse table that xid indexes


def their_prior(
  channels: int, parts: int, locations: int, width: int, depth: int, canvas: int, steps: int
):
  """Their CNNHead (ViT prior), freshly initialised, with the flags their loader builds it with."""
  from model.modules import prior_sampler
  from model.vit_prior import CNNHead

  return CNNHead(
    rnn_hid=width,
    input_dim=channels + 1,
    sampler=prior_sampler(n_class_sel=parts, n_class_loc=locations),
    pos_encode=0,
    use_emb_enc=0,
    activation='sigmoid_last_dim',
    mask_out_prevloc_samples=0,
    use_cnn_process=1,
    concat_one_hot=0,
    input_id_only=0,
    canvasd=channels,
    mlp_dim=PRIOR_FLAGS['vit_mlp_dim'],
    depth=depth,
    vit_dropout=1,
    canvas_size=canvas,
    nloc=steps,
    head_dims=[parts, locations, 1],
  )


def _write_prior_dir(directory: str, dataset: str) -> str:
  """The files their loader reads beside prior.pt; returns prior.pt's path."""
  flags = SCRIPT_FLAGS[dataset]
  rng = np.random.default_rng(0)
  steps, parts, patch = flags['vary_loc_vae.nloc'], flags['K'], flags['ww']
  stride, channels = flags['vary_loc_vae.loc_stride'], flags['cat_vae.canvas_dim']
  canvas = CANVAS_SIZE[dataset]
  side = -(-canvas // stride)
  # Location table [1, L, 2]: the centre of each candidate patch position.
  centres = np.arange(side) * stride + patch / 2
  rows, cols = np.meshgrid(centres, centres, indexing='ij')
  table = np.stack([rows.ravel(), cols.ravel()], -1)[None].astype(np.float32)
  np.save(os.path.join(directory, 'float_matrix.npy'), table)
  np.save(
    os.path.join(directory, 'patch_bank.npy'),
    rng.random((parts, patch, patch, channels), dtype=np.float32),
  )
  # Parse supervision [N, T, 5]: part id, top-left row and column, two masks.
  for split in ('train', 'eval'):
    gt = np.zeros((TRAINING_IMAGES, steps, 5))
    gt[..., 0] = rng.integers(0, parts, gt.shape[:2])
    gt[..., 1:3] = rng.integers(0, side, (*gt.shape[:2], 2)) * stride
    gt[..., 3:] = 1
    centred = canvas // 2 - patch // 2
    name = f'cached_gt{split}_gt_{steps}-{centred}-1-0.npy'
    np.save(os.path.join(directory, name), gt)
  prior_flags = dict(PRIOR_FLAGS, nloc=steps, k=parts, pw=patch, inputd=channels + 1)
  with open(os.path.join(directory, 'cfg.yml'), 'w') as f:
    yaml.safe_dump(prior_flags, f)
  prior = their_prior(
    channels,
    parts,
    table.shape[1],
    prior_flags['hidden_size_prior'],
    prior_flags['vit_depth'],
    canvas,
    steps,
  )
  path = os.path.join(directory, 'prior.pt')
  # Their loader builds its own prior and loads these weights strictly, so a
  # structure other than theirs fails there.
  torch.save(prior.state_dict(), path)
  return path


def _stack_as_in_torch_1_6(stack):
  def contiguous_stack(*args, **kwargs):
    return stack(*args, **kwargs).contiguous()

  return contiguous_stack


def _residual_forward(self, x):
  """Their Residual.forward with its first, in-place ReLU out of place."""
  x = torch.relu(x)
  return x + self.block[1:](x)


def build(repo: str, dataset: str, batch: int, directory: str):
  """Their training step on a fixed random batch: each call runs one and returns the loss."""
  sys.path.insert(0, repo)
  torch.stack = _stack_as_in_torch_1_6(torch.stack)
  from model import modules

  first = modules.Residual(1).block[0]
  if not (isinstance(first, torch.nn.ReLU) and first.inplace):
    raise RuntimeError(f'Their Residual block no longer opens with an in-place ReLU ({first}).')
  modules.Residual.forward = _residual_forward
  from config import cfg
  from model.vary_loc_at import CatVaryLocAT
  from runner.category_vae_runner import step_iter
  from utils.metric_logger import MetricLogger

  prior_path = _write_prior_dir(directory, dataset)
  flags = dict(SCRIPT_FLAGS[dataset], batch_size=batch, prior_weight=prior_path, seed=0)
  cfg.merge_from_list([str(x) for item in flags.items() for x in item])
  cfg.exp_dir = directory
  cfg.distributed = False  # train_vae.py sets it from its --distributed flag (default False)
  torch.manual_seed(0)
  model = CatVaryLocAT(cfg)
  model.set_bank(torch.device('cpu'))
  optimizer = model.get_optim(cfg.lr)
  model.train()
  epoch = 0
  model.anneal_per_epoch(epoch)
  model.anneal_tgq(epoch)
  pixels = model.img_size**2 * model.imgd
  images = torch.rand(batch, pixels)
  if dataset == 'mnist':
    images = (images < 0.2).float()
  else:
    images = torch.round(images * 255) / 255
  ids = torch.randint(0, TRAINING_IMAGES, (batch,))
  metric = MetricLogger()

  def step() -> float:
    model.set_xid(ids)
    return step_iter(model, images, optimizer, cfg.cat_vae, metric, epoch, cfg)[0]

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repo', required=True, help='a checkout of ZENGXH/NPDRAW')
  parser.add_argument('--dataset', choices=sorted(SCRIPT_FLAGS), required=True)
  parser.add_argument('--batch', type=int, required=True)
  parser.add_argument('--steps', type=int, default=10, help='timed steps after two warm-up ones')
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.repo, 'model', 'vary_loc_at.py')):
    parser.error(f'--repo={args.repo}: no model/vary_loc_at.py, not a ZENGXH/NPDRAW checkout.')
  from loguru import logger

  logger.remove()  # Their model logs at every build; the JSON line is the output.
  with tempfile.TemporaryDirectory() as directory:
    step = build(os.path.abspath(args.repo), args.dataset, args.batch, directory)
    for _ in range(2):
      loss = step()
    if not np.isfinite(loss):
      raise FloatingPointError(f'their step gave a non-finite loss {loss}')
    seconds = []
    for _ in range(args.steps):
      start = time.perf_counter()
      step()
      seconds.append(time.perf_counter() - start)
  print(
    json.dumps(
      {
        'dataset': args.dataset,
        'batch': args.batch,
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'seconds': seconds,
        'median_s': statistics.median(seconds),
      }
    )
  )


if __name__ == '__main__':
  main()
