"""The Flax FID Inception against pytorch-fid's network, both with one set of random weights.

  python -m benchmarks.fid_port_check [--images=2] [--seed=0]

Run it in an environment that also has torch, torchvision and pytorch-fid
(they are not npdraw-jax requirements). pytorch-fid's InceptionV3 (pool3
block, its default resize and scaling) is built without downloading its
weights; every batch norm gets random scale, bias, running mean and running
variance on top of torch's random convolutions. Its state_dict goes through
our converter to an .npz, fid.load_inception reads that back, and both
networks compute pool3 features of the same random images at several input
sizes (grey ones as pytorch-fid sees them: repeated to RGB). Appends the
largest differences to benchmarks/RESULTS.md.
"""

import copy
import os
import tempfile
import time
from unittest import mock

import numpy as np
import pytorch_fid
import torch
import torchvision
from absl import app, flags
from pytorch_fid import inception as pytorch_fid_inception

from benchmarks import results
from npdraw_jax import convert_inception
from npdraw_jax.stages import fid

_IMAGES = flags.DEFINE_integer('images', 2, 'Images per input size.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the random weights and images.')

# (height, width, channels): identity resize, grey upsampling, non-square, shrinking.
SIZES = ((299, 299, 3), (28, 28, 1), (64, 48, 3), (400, 350, 3))


def reference_network(seed: int):
  """(pytorch-fid's InceptionV3 returning pool3, the torchvision Inception3 inside it).

  Both share one set of random weights: the download is skipped, batch norm
  gets a random scale and bias, and its running statistics are those of four
  random images. Without that, torch's default initialisation shrinks the
  activations layer by layer until every image gives the same features.
  """
  inception_cls = torchvision.models.inception.Inception3
  torch.manual_seed(seed)  # torch's initial convolution weights
  with (
    mock.patch.object(pytorch_fid_inception, 'load_state_dict_from_url', return_value={}),
    mock.patch.object(inception_cls, 'load_state_dict', autospec=True) as load,
  ):
    net = pytorch_fid_inception.InceptionV3([3])
  inception = load.call_args.args[0]  # the patched network whose layers `net` holds
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in inception.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(0.5 + torch.rand(n, generator=generator))
        module.bias.copy_(0.2 * torch.randn(n, generator=generator))
        module.reset_running_stats()
        module.momentum = None  # running statistics = those of the next batch
    net.train()(random_images(generator, (4, 299, 299, 3)).permute(0, 3, 1, 2))
  return net.eval(), inception


def random_images(generator, shape) -> torch.Tensor:
  """Uniform noise in [0, 1] [N, H, W, C], each image with its own brightness and contrast."""
  n = shape[0]
  contrast = torch.rand(n, 1, 1, 1, generator=generator)
  offset = (1 - contrast) * torch.rand(n, 1, 1, 1, generator=generator)
  return offset + contrast * torch.rand(shape, generator=generator)


def converted_features_fn(inception, directory: str):
  """Our feature function on the torch weights, saved and converted through files."""
  torch_path = os.path.join(directory, 'inception.pth')
  npz_path = os.path.join(directory, 'inception.npz')
  torch.save(inception.state_dict(), torch_path)
  convert_inception.convert(torch_path, npz_path)
  return fid.make_feature_fn(fid.load_inception(npz_path))


def torch_features(net, images: np.ndarray, dtype=torch.float32) -> np.ndarray:
  """pytorch-fid's pool3 features [N, 2048] of images [N, H, W, C]; grey repeated to RGB."""
  rgb = np.broadcast_to(images, (*images.shape[:3], 3)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    return net(torch.tensor(rgb, dtype=dtype))[0][:, :, 0, 0].numpy()


def compare(want: np.ndarray, got) -> dict:
  """Largest differences between reference features `want` and ours, both [N, 2048]."""
  diff = np.abs(np.asarray(got, np.float64) - want)
  return {
    'max_abs': float(diff.max()),
    'max_feature': float(np.abs(want).max()),
    'max_rel': float(diff.max() / np.abs(want).max()),
    # How far apart two images' features are: the scale a port error competes with.
    'spread': float(np.abs(want - want[::-1]).max()),
  }


def run(num_images: int, seed: int) -> list[tuple[tuple[int, int, int], dict]]:
  """(size, compare's dict + the float32 networks' distances from torch in float64) per size."""
  net, inception = reference_network(seed)
  net64 = copy.deepcopy(net).double()
  generator = torch.Generator().manual_seed(seed + 1)
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    features_fn = converted_features_fn(inception, directory)
    for size in SIZES:
      images = random_images(generator, (num_images, *size)).numpy()
      want, exact = torch_features(net, images), torch_features(net64, images, torch.float64)
      got = np.asarray(features_fn(images))
      row = compare(want, got)
      row['ours_vs_float64'] = compare(exact, got)['max_abs']
      row['torch_vs_float64'] = compare(exact, want)['max_abs']
      rows.append((size, row))
  return rows


def main(argv):
  del argv
  start = time.time()
  rows = run(_IMAGES.value, _SEED.value)
  table = [
    '| input | images | max abs diff | max abs feature | diff / feature | max diff between '
    'images | ours vs torch float64 | torch float32 vs float64 |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for (h, w, c), r in rows:
    table.append(
      f'| {h}x{w}x{c} | {_IMAGES.value} | {r["max_abs"]:.2e} | {r["max_feature"]:.3f} '
      f'| {r["max_rel"]:.2e} | {r["spread"]:.3f} | {r["ours_vs_float64"]:.2e} '
      f'| {r["torch_vs_float64"]:.2e} |'
    )
  worst = max(r['max_abs'] for _, r in rows)
  worst_rel = max(r['max_rel'] for _, r in rows)
  text = results.append_section(
    'FID Inception port check: Flax against pytorch-fid',
    [
      f'pytorch-fid {pytorch_fid.__version__} InceptionV3 (pool3, its resize to 299x299 and '
      f'scaling), torch {torch.__version__}, torchvision {torchvision.__version__}; random '
      f"weights (seed {_SEED.value}): torch's initial convolutions, random batch-norm scale "
      'and bias, running means and variances measured on four random images. Converted by '
      'npdraw_jax.convert_inception, read by fid.load_inception; the same random images '
      '(noise of random brightness and contrast) through both, float32 on CPU. Grey inputs '
      'reach pytorch-fid repeated to RGB. "max abs diff": largest |ours - pytorch-fid| over '
      'the 2048-d features of all the images; the last two columns compare each float32 '
      'network with pytorch-fid run in float64, the round-off floor.',
      '',
      *table,
      '',
      f'Largest absolute difference: {worst:.2e}; largest relative to the largest feature: '
      f'{worst_rel:.2e}. Whole check: {time.time() - start:.0f} s.',
    ],
  )
  print(text)


if __name__ == '__main__':
  app.run(main)
