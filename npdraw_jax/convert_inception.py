"""Converts pytorch-fid's FID Inception weights (a torch state_dict) to our .npz.

  python -m npdraw_jax.convert_inception \
      --torch_weights=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

The weights are pytorch-fid's port of the TensorFlow FID Inception graph
(inception-2015-12-05), released at
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
Only this converter needs torch (`pip install torch`); the .npz it writes is
what npdraw_jax.stages.fid.load_inception reads.
"""

import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from npdraw_jax.stages import fid

_TORCH_WEIGHTS = flags.DEFINE_string('torch_weights', None, "pytorch-fid's .pth state_dict.")
_OUT = flags.DEFINE_string('out', None, 'Where to write the .npz for --config.eval.fid_weights.')

# torch name of a parameter or buffer -> (collection, flax name, transform).
_LEAVES = {
  'conv.weight': ('params', 'conv/kernel', lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
  'bn.weight': ('params', 'bn/scale', None),
  'bn.bias': ('params', 'bn/bias', None),
  'bn.running_mean': ('batch_stats', 'bn/mean', None),
  'bn.running_var': ('batch_stats', 'bn/var', None),
}
# The classifier has no place in the feature network (nor have batch norm's step counters).
_DROPPED = ('fc.weight', 'fc.bias')


def torch_to_variables(state_dict: dict[str, np.ndarray]) -> dict:
  """pytorch-fid Inception state_dict (NumPy values) -> {'params', 'batch_stats'} for flax."""
  flat = {}
  for name, value in state_dict.items():
    if name in _DROPPED or name.endswith('.num_batches_tracked'):
      continue
    module, _, leaf = name.rpartition('.')
    block, _, layer = module.rpartition('.')
    if f'{layer}.{leaf}' not in _LEAVES:
      raise ValueError(f'Unexpected entry {name!r} in the torch state_dict.')
    collection, flax_leaf, transform = _LEAVES[f'{layer}.{leaf}']
    value = np.asarray(value, np.float32)
    path = '/'.join([collection, *block.split('.'), flax_leaf])
    flat[path] = transform(value) if transform else value
  return traverse_util.unflatten_dict(flat, sep='/')


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a torch state_dict file as NumPy arrays."""
  try:
    import torch  # Only the converter needs torch.
  except ImportError as e:
    raise ImportError(
      'Converting the FID weights needs torch: pip install torch (or the fid extra).'
    ) from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  return {name: tensor.numpy() for name, tensor in state_dict.items()}


def convert(torch_weights: str, out: str) -> None:
  """Reads the torch state_dict file, writes the .npz that fid.load_inception reads."""
  fid.save_inception(out, torch_to_variables(load_torch_state_dict(torch_weights)))


def main(argv):
  del argv
  convert(_TORCH_WEIGHTS.value, _OUT.value)
  logging.info('Wrote the FID Inception variables to %s.', _OUT.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['torch_weights', 'out'])
  app.run(main)
