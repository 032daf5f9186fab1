"""Converts an experiment released by the NP-DRAW authors into an npdraw-jax run directory.

  python -m npdraw_jax.convert_authors --authors_dir=exp/stoch_mnist/cat_vloc_at/0208/NAME \
      --workdir=runs/mnist_authors [--checkpoint=E00550.pth] [--prior_dir=DIR] \
      [--config=configs/mnist.py --config.data.source=embedded ...]

Their release (https://github.com/ZENGXH/NPDRAW, README "Pretrained Model")
unzips to exp/<data>/cat_vloc_at/.../<checkpoint>.pth, a torch.save of {model
(state_dict, the frozen prior inside as prior_model.*), optim, cfg (a yacs
CfgNode), test_loss, epo, best_epo}, and exp/cnn_prior/<data>/.../ holding
prior.pt, cfg.yml, patch_bank.npy and float_matrix.npy; the stage-2 cfg names
that folder by its prior_weight, relative to the release root (their
CatVaryLocAT.try_load_float_matrix and ph_helper.load_prior_with_patch_bank
read the folder the same way). No torch is needed: the .pth is read by a
restricted unpickler that builds NumPy arrays and refuses every class a
checkpoint of theirs does not hold.

The run directory gets what our stages verify: partbank.npz (their parts, in
their order), prior/ (their prior, at step prior.train_steps), parses.npz (the
parse stage run on the configured data with their part bank; the eval stage
reads the training parses' count), vae/ (their encoder and decoder, batch
statistics included, at the step the configuration trains to) and the
configuration in vae/config.json, so that `--stages=eval`, npdraw_jax.load_run,
experiments.edit and experiments.explore use it as a finished run.
authors_conversion.json records where it came from.

The decoder's output channels are mapped one to one, only reordered into our
layout (distributions.py): their logistic and mixture means are on the [0, 1]
scale, which model.likelihood_convention = 'authors' reads.
"""

import collections
import dataclasses
import importlib
import io
import os
import pickle
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
import yaml
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from npdraw_jax import errors
from npdraw_jax.infra import artifacts, checkpointing, pictures, run_dir, training
from npdraw_jax.model import canvas, npdraw, partbank
from npdraw_jax.stages import bank_parse, train_prior, train_vae

RECORD_FILE = 'authors_conversion.json'


class AuthorsFormatError(errors.UserError, ValueError):
  """A file or folder that is not what the authors' release holds."""


class ShapeMismatchError(errors.UserError, ValueError):
  """Their experiment does not fit the configuration's shapes."""


# --- Reading torch files without torch ----------------------------------------------

# torch's storage classes -> the dtype of their raw bytes (little-endian on disk).
_STORAGE_DTYPES = {
  'DoubleStorage': '<f8',
  'FloatStorage': '<f4',
  'HalfStorage': '<f2',
  'BFloat16Storage': '<u2',  # The top half of a float32: widened in _storage_array.
  'LongStorage': '<i8',
  'IntStorage': '<i4',
  'ShortStorage': '<i2',
  'CharStorage': 'i1',
  'ByteStorage': 'u1',
  'BoolStorage': '?',
}
# Modules whose CfgNode a pickled config of theirs names (yacs', or their copy of it).
_CONFIG_MODULES = ('yacs.config', 'utils.yacs_config')


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What the unpickler returns for torch.<Name>Storage: only its dtype."""

  name: str


class ConfigNode(dict):
  """A pickled yacs CfgNode as a plain dict; keys also read as attributes."""

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def _storage_array(raw: bytes, storage: _StorageType, big_endian: bool) -> np.ndarray:
  dtype = np.dtype(_STORAGE_DTYPES[storage.name])
  if big_endian:
    dtype = dtype.newbyteorder('>')
  array = np.frombuffer(raw, dtype)
  if storage.name == 'BFloat16Storage':
    return (array.astype(np.uint32) << 16).view(np.float32)
  return array


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2: the strided view of a storage, copied into a NumPy array."""
  del requires_grad, hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise AuthorsFormatError('A tensor in the torch file has no storage.')
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or min(stride, default=0) < 0:
    raise AuthorsFormatError(f'A tensor of size {size} has strides {stride}.')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if offset < 0 or last >= storage.size:
    raise AuthorsFormatError(
      f'A tensor of size {size} reaches element {last} of a storage of {storage.size}.'
    )
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False
  )
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
  del requires_grad, hooks
  return data


def _numpy_scalar(dtype, data: bytes):
  return np.frombuffer(data, dtype)[0]


class _Unpickler(pickle.Unpickler):
  """Builds NumPy arrays from a torch file's pickle; any class but a few is an error."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._path = archive, prefix, path
    order = f'{prefix}/byteorder'
    self._big_endian = order in archive.namelist() and archive.read(order).strip() == b'big'
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    allowed = {
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      # Sets (a CfgNode keeps its deprecated keys in one), as protocol 2 names them.
      ('__builtin__', 'set'): set,
      ('builtins', 'set'): set,
      ('__builtin__', 'frozenset'): frozenset,
      ('builtins', 'frozenset'): frozenset,
      ('numpy', 'dtype'): np.dtype,
      ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
      ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    }
    if (module, name) in allowed:
      return allowed[module, name]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module in _CONFIG_MODULES and name == 'CfgNode':
      return ConfigNode
    raise AuthorsFormatError(
      f'{self._path} names {module}.{name}, which no checkpoint of the authors holds; '
      'refusing to load it (unpickling it could run code).'
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise AuthorsFormatError(f'{self._path} holds an unknown persistent id {pid!r:.80}.')
    _, storage, key, _, numel = pid
    if not isinstance(storage, _StorageType):
      raise AuthorsFormatError(f'{self._path} holds a storage of unknown type {storage!r:.80}.')
    if key not in self._storages:
      entry = f'{self._prefix}/data/{key}'
      try:
        raw = self._archive.read(entry)
      except KeyError:
        raise AuthorsFormatError(f'{self._path} lacks the storage {entry}.') from None
      array = _storage_array(raw, storage, self._big_endian)
      if array.size < numel:
        raise AuthorsFormatError(f'{self._path}: storage {entry} is cut short.')
      self._storages[key] = array[:numel]
    return self._storages[key]


def read_torch_file(path: str) -> Any:
  """What torch.load(path) returns, with NumPy arrays for tensors; never imports torch.

  Reads torch's zip format (torch >= 1.6): <name>/data.pkl and the raw
  storages <name>/data/<key>. Raises AuthorsFormatError for anything else
  (the legacy format included) and for a pickle naming any class beyond
  tensors, storages, OrderedDict, sets, NumPy scalars and yacs CfgNode.
  """
  if not os.path.isfile(path):
    raise AuthorsFormatError(f'{path} is not a file.')
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(2)
    if head[:1] == b'\x80':
      raise AuthorsFormatError(
        f"{path} is in torch's legacy (pre-1.6) format, which this reader does not read: "
        'load and save it again with torch >= 1.6 (torch.save writes the zip format).'
      )
    raise AuthorsFormatError(f'{path} is not a torch checkpoint (not a zip archive).')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise AuthorsFormatError(f'{path} is a zip archive but not a torch checkpoint (no data.pkl).')
    prefix = pickles[0].split('/')[0]
    try:
      return _Unpickler(archive.read(pickles[0]), archive, prefix, path).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
      if isinstance(e, errors.UserError):
        raise
      raise AuthorsFormatError(f'{path}: its pickle is damaged ({e}).') from e


# --- The release: checkpoint, prior folder ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Release:
  """What one experiment of theirs holds, read.

  Attributes:
    checkpoint: the stage-2 .pth.
    prior_dir: the folder of prior.pt, cfg.yml, patch_bank.npy, float_matrix.npy.
    state: their state_dict (NumPy arrays, 'module.' prefixes removed).
    cfg: their stage-2 configuration (a ConfigNode).
    prior_cfg: cfg.yml of the prior ({} when absent).
    epoch, best_epoch, test_loss: as saved.
  """

  checkpoint: str
  prior_dir: str
  state: dict[str, np.ndarray]
  cfg: ConfigNode
  prior_cfg: dict
  epoch: int
  best_epoch: int
  test_loss: float


def find_checkpoint(authors_dir: str, name: str | None = None) -> str:
  """The stage-2 .pth: authors_dir itself, `name` under it, or the only .pth below it."""
  if os.path.isfile(authors_dir):
    return authors_dir
  if not os.path.isdir(authors_dir):
    raise AuthorsFormatError(f'--authors_dir={authors_dir} does not exist.')
  if name:
    path = name if os.path.isabs(name) else os.path.join(authors_dir, name)
    if os.path.isfile(path):
      return path
    found = [p for p in _files_below(authors_dir, '.pth') if os.path.basename(p) == name]
    if len(found) == 1:
      return found[0]
    raise AuthorsFormatError(f'No single checkpoint {name} under {authors_dir} (found {found}).')
  found = _files_below(authors_dir, '.pth')
  if len(found) == 1:
    return found[0]
  if not found:
    raise AuthorsFormatError(
      f'{authors_dir} holds no .pth checkpoint: not their experiment folder.'
    )
  shown = ', '.join(os.path.relpath(p, authors_dir) for p in found[:6])
  raise AuthorsFormatError(
    f'{authors_dir} holds {len(found)} checkpoints ({shown}{", ..." if len(found) > 6 else ""}): '
    'choose one with --checkpoint.'
  )


def _files_below(directory: str, suffix: str) -> list[str]:
  return sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(directory)
    for name in names
    if name.endswith(suffix)
  )


def find_prior_dir(checkpoint: str, prior_weight: str, authors_dir: str) -> str:
  """Their prior folder: dirname(cfg.prior_weight), absolute or relative to the
  release root (a folder above the checkpoint or the given authors_dir)."""
  relative = os.path.dirname(prior_weight)
  if os.path.isabs(relative) and os.path.isdir(relative):
    return relative
  tried = []
  for start in (os.path.dirname(os.path.abspath(checkpoint)), os.path.abspath(authors_dir)):
    folder = start
    while True:
      candidate = os.path.join(folder, relative.lstrip('./'))
      if os.path.isfile(os.path.join(candidate, 'prior.pt')):
        return candidate
      tried.append(folder)
      parent = os.path.dirname(folder)
      if parent == folder:
        break
      folder = parent
  raise AuthorsFormatError(
    f"Their prior folder {relative} (the checkpoint's cfg.prior_weight) is under none of the "
    f'folders above {checkpoint}: unzip the prior beside it (exp/cnn_prior/...) or pass '
    '--prior_dir.'
  )


def read_release(
  authors_dir: str, checkpoint_name: str | None = None, prior_dir: str | None = None
) -> Release:
  """Reads their stage-2 checkpoint and locates its prior folder."""
  checkpoint = find_checkpoint(authors_dir, checkpoint_name)
  saved = read_torch_file(checkpoint)
  if not isinstance(saved, dict) or not {'model', 'cfg'} <= set(saved):
    keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
    raise AuthorsFormatError(
      f'{checkpoint} is not their stage-2 checkpoint (a dict with model and cfg; got {keys}).'
    )
  state = {k.removeprefix('module.'): v for k, v in saved['model'].items()}
  cfg = saved['cfg']
  if not isinstance(cfg, dict) or 'prior_weight' not in cfg or 'dataset' not in cfg:
    raise AuthorsFormatError(f'{checkpoint}: its cfg is not their stage-2 configuration.')
  if prior_dir is None:
    prior_dir = find_prior_dir(checkpoint, cfg['prior_weight'], authors_dir)
  for name in ('patch_bank.npy', 'float_matrix.npy'):
    if not os.path.isfile(os.path.join(prior_dir, name)):
      raise AuthorsFormatError(f'Their prior folder {prior_dir} lacks {name}.')
  prior_cfg = {}
  cfg_path = os.path.join(prior_dir, 'cfg.yml')
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      prior_cfg = yaml.safe_load(f) or {}
  return Release(
    checkpoint=checkpoint,
    prior_dir=prior_dir,
    state=state,
    cfg=cfg,
    prior_cfg=prior_cfg,
    epoch=int(saved.get('epo', -1)),
    best_epoch=int(saved.get('best_epo', -1)),
    test_loss=float(saved.get('test_loss', float('nan'))),
  )


# --- Configuration --------------------------------------------------------------------

# Their dataset names -> our reference config (configs/<name>.py).
_CONFIG_OF_DATASET = {
  'mnist': 'mnist',
  'stoch_mnist': 'mnist',
  'omni': 'omniglot',
  'omni32': 'omniglot',
  'cifarcm': 'cifar10',
  'celebac32': 'celeba',
}


def reference_config(cfg: dict) -> ml_collections.ConfigDict:
  """Our reference configuration of their cfg.dataset (configs/ of this checkout)."""
  dataset = cfg['dataset']
  if dataset not in _CONFIG_OF_DATASET:
    raise ShapeMismatchError(
      f'Their dataset {dataset!r} has no npdraw-jax reference config (known: '
      f'{", ".join(sorted(_CONFIG_OF_DATASET))}); pass --config.'
    )
  return importlib.import_module(f'configs.{_CONFIG_OF_DATASET[dataset]}').get_config()


def _their_heads(mlp_dim: int) -> int:
  """CNNHead's head count, which it derives from the MLP width (heads of 64)."""
  return 4 if mlp_dim <= 56 else 8 if mlp_dim <= 128 else 16


def check_config(release: Release, config: ml_collections.ConfigDict) -> None:
  """Raises ShapeMismatchError when their settings do not fit the configuration."""
  cfg, m, p = release.cfg, config.model, config.prior
  vary = cfg.get('vary_loc_vae', {})
  head = 'fcn' if vary.get('enc_version', -1) > 0 else 'mlp'
  pairs = [
    ('K', cfg.get('K'), 'model.K', m.K),
    ('wh', cfg.get('wh'), 'model.patch_size', m.patch_size),
    ('ww', cfg.get('ww'), 'model.patch_size', m.patch_size),
    ('vary_loc_vae.nloc', vary.get('nloc'), 'model.T', m.T),
    ('vary_loc_vae.loc_stride', vary.get('loc_stride'), 'model.location_stride', m.location_stride),
    ('enc_hid', cfg.get('enc_hid'), 'model.encoder_features', m.encoder_features),
    ('dec_hid', cfg.get('dec_hid'), 'model.decoder_features', m.decoder_features),
    ('vary_loc_vae.enc_version', head, 'model.encoder_head', m.encoder_head),
    (
      'cat_vae.canvas_dim',
      cfg.get('cat_vae', {}).get('canvas_dim'),
      'data.channels',
      config.data.channels,
    ),
  ]
  prior = release.prior_cfg
  if prior:
    mlp = prior.get('vit_mlp_dim', p.mlp_dim)
    pairs += [
      ('prior hidden_size_prior', prior.get('hidden_size_prior'), 'prior.d_model', p.d_model),
      ('prior vit_depth', prior.get('vit_depth'), 'prior.num_layers', p.num_layers),
      ('prior vit_mlp_dim', mlp, 'prior.mlp_dim', p.mlp_dim),
      ('prior heads', _their_heads(mlp), 'prior.num_heads', p.num_heads),
      ('prior head width', 64, 'prior.head_dim', p.head_dim),
      ('prior k', prior.get('k'), 'model.K', m.K),
      ('prior nloc', prior.get('nloc'), 'model.T', m.T),
    ]
  if m.networks != 'authors':
    pairs.append(('networks', 'authors', 'model.networks', m.networks))
  for theirs, value, ours, wanted in pairs:
    if value is not None and value != wanted:
      raise ShapeMismatchError(
        f'Their {theirs} is {value!r} but {ours} is {wanted!r}: a dataset whose shapes do not '
        'fit this configuration (pass --config or --config.FIELD=VALUE to match theirs).'
      )


# --- Part bank and location table ---------------------------------------------------


def read_part_bank(prior_dir: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """Their patch_bank.npy as our bank [K, p, p, C] in [0, 1].

  Their loader reads the array in memory order as [K, p, p, C] whatever its
  shape, dividing by 255 when its maximum exceeds 1.
  """
  path = os.path.join(prior_dir, 'patch_bank.npy')
  bank = np.load(path, allow_pickle=False).astype(np.float32)
  m = config.model
  shape = (m.K, m.patch_size, m.patch_size, config.data.channels)
  if bank.size != np.prod(shape) or bank.shape[0] != m.K:
    raise ShapeMismatchError(
      f'{path} holds {bank.shape}, not {m.K} parts of {shape[1:]}: a dataset whose shapes do not '
      'fit this configuration.'
    )
  if bank.max() > 1:
    bank = bank / np.float32(255.0)
  return bank.reshape(shape)


def check_location_table(prior_dir: str, config: ml_collections.ConfigDict) -> None:
  """Their float_matrix.npy [1, L, 2] must centre location l on our corner l + p / 2.

  Their renderer pastes a part centred at the table's (row, col); ours at the
  top-left corner Grid.corners()[l]. Any other table (another order, spacing or
  offset) is an error.
  """
  path = os.path.join(prior_dir, 'float_matrix.npy')
  table = np.load(path, allow_pickle=False)
  grid = canvas.grid_from_config(config)
  expected = grid.corners().astype(np.float64) + grid.patch_size / 2
  found = table.reshape(-1, 2) if table.ndim == 3 and table.shape[0] == 1 else None
  if found is None or found.shape != expected.shape:
    raise ShapeMismatchError(
      f'{path} holds {table.shape}, not [1, {grid.num_locations}, 2]: a dataset whose shapes do '
      f'not fit this configuration (canvas {grid.canvas_size}, stride {grid.stride}).'
    )
  wrong = np.flatnonzero(np.abs(found - expected).max(axis=1) > 1e-4)
  if wrong.size:
    first = int(wrong[0])
    raise ShapeMismatchError(
      f'{path}: location {first} is centred at {found[first].tolist()}, ours at '
      f'{expected[first].tolist()} '
      f'(corner + patch / 2 on the {grid.side}x{grid.side} grid of stride {grid.stride}).'
    )


# --- Their state_dict -> our variables ------------------------------------------------


class _Tensors:
  """Their tensors, each to be taken exactly once."""

  def __init__(self, state: dict[str, np.ndarray], prefix: str):
    self.prefix = prefix
    self._state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    self._taken: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self._state

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._state[name].shape) if name in self._state else ()

  def take(self, name: str) -> np.ndarray:
    if name not in self._state:
      raise ShapeMismatchError(
        f'Their checkpoint lacks {self.prefix}{name}: a model whose shapes do not fit this '
        'configuration.'
      )
    if name in self._taken:
      raise AssertionError(f'{self.prefix}{name} mapped twice.')
    self._taken.add(name)
    return np.asarray(self._state[name])

  def modules(self, under: str) -> list[str]:
    """The module names below `under` that hold tensors, in their order."""
    seen = []
    for name in self._state:
      if name.startswith(under):
        module = name.rsplit('.', 1)[0]
        if module not in seen:
          seen.append(module)
    return seen

  def check_all_taken(self) -> None:
    left = [k for k in self._state if k not in self._taken]
    if left:
      shown = ', '.join(self.prefix + k for k in left[:4])
      raise ShapeMismatchError(
        f'{len(left)} of their tensors have no place in this configuration ({shown}'
        f'{", ..." if len(left) > 4 else ""}): a model whose shapes do not fit.'
      )


def _conv(w: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO."""
  return w.transpose(2, 3, 1, 0)


def _conv_transpose(w: np.ndarray) -> np.ndarray:
  """ConvTranspose2d's [in, out, kh, kw] -> our ConvTranspose's HWIO, spatially flipped."""
  return w.transpose(2, 3, 0, 1)[::-1, ::-1]


def _linear(w: np.ndarray) -> np.ndarray:
  """[out, in] -> [in, out]."""
  return w.T


def _linear_after_flatten(w: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
  """A linear layer reading their NCHW flatten -> one reading our NHWC flatten."""
  c, h, width = chw
  kernel = w.T.reshape(c, h, width, -1).transpose(1, 2, 0, 3)
  return kernel.reshape(c * h * width, -1)


class _Target:
  """Our variables, filled leaf by leaf; each leaf exactly once, shapes checked."""

  def __init__(self, abstract: dict, name: str):
    self.name = name
    self._shapes = {
      k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep='/').items()
    }
    self._values: dict[str, np.ndarray] = {}

  def put(self, path: str, value: np.ndarray, source: str) -> None:
    if path not in self._shapes:
      raise ShapeMismatchError(
        f'Their {source} has no place in our {self.name} ({path}): a model whose shapes do not '
        'fit this configuration.'
      )
    if path in self._values:
      raise AssertionError(f'{self.name} {path} filled twice.')
    if tuple(value.shape) != self._shapes[path]:
      raise ShapeMismatchError(
        f'Their {source} {tuple(value.shape)} does not fit our {self.name} {path} '
        f'{self._shapes[path]}: a dataset whose shapes do not fit this configuration.'
      )
    self._values[path] = np.ascontiguousarray(value, np.float32)

  def has(self, path: str) -> bool:
    return path in self._shapes

  def tree(self) -> dict:
    missing = [k for k in self._shapes if k not in self._values]
    if missing:
      raise ShapeMismatchError(
        f'Their checkpoint has nothing for our {self.name} {", ".join(missing[:4])}: a model '
        'whose shapes do not fit this configuration.'
      )
    return traverse_util.unflatten_dict(self._values, sep='/')


def _put_conv(tensors, module, target, path, kind='conv', kernel_map=None):
  weight = tensors.take(f'{module}.weight')
  if weight.ndim != 4:
    raise ShapeMismatchError(
      f'Their {tensors.prefix}{module} is not a convolution where our {target.name} has {path}: '
      'a model whose structure does not fit this configuration.'
    )
  kernel = (_conv_transpose if kind == 'convT' else _conv)(weight)
  if kernel_map is not None:
    kernel = kernel_map(kernel)
  target.put(f'{path}/kernel', kernel, f'{tensors.prefix}{module}.weight')
  if tensors.has(f'{module}.bias'):
    bias = tensors.take(f'{module}.bias')
    if kernel_map is not None:
      bias = kernel_map(bias[None, None, None])[0, 0, 0]
    target.put(f'{path}/bias', bias, f'{tensors.prefix}{module}.bias')


def _put_batch_norm(tensors, module, params, stats, path):
  if not tensors.has(f'{module}.running_mean'):
    raise ShapeMismatchError(
      f'Their {tensors.prefix}{module} is not a batch norm where our {params.name} has {path}: '
      'a model whose structure does not fit this configuration.'
    )
  source = f'{tensors.prefix}{module}'
  params.put(f'{path}/scale', tensors.take(f'{module}.weight'), f'{source}.weight')
  params.put(f'{path}/bias', tensors.take(f'{module}.bias'), f'{source}.bias')
  stats.put(f'{path}/mean', tensors.take(f'{module}.running_mean'), f'{source}.running_mean')
  stats.put(f'{path}/var', tensors.take(f'{module}.running_var'), f'{source}.running_var')
  if tensors.has(f'{module}.num_batches_tracked'):
    tensors.take(f'{module}.num_batches_tracked')  # Their momentum is fixed: the count is unused.


def _put_linear(tensors, module, target, path, chw=None):
  weight = tensors.take(f'{module}.weight')
  if weight.ndim != 2:
    raise ShapeMismatchError(
      f'Their {tensors.prefix}{module} is not a linear layer where our {target.name} has {path}.'
    )
  kernel = _linear(weight) if chw is None else _linear_after_flatten(weight, chw)
  target.put(f'{path}/kernel', kernel, f'{tensors.prefix}{module}.weight')
  if tensors.has(f'{module}.bias'):
    target.put(f'{path}/bias', tensors.take(f'{module}.bias'), f'{tensors.prefix}{module}.bias')


def _trunk_layers(tensors: _Tensors, under: str) -> list[str]:
  """Their Sequential's layers with tensors, in order, residual blocks as one entry."""
  layers = []
  for module in tensors.modules(under):
    top = module[len(under) :].split('.')[0]
    if under + top not in layers:
      layers.append(under + top)
  return layers


def _put_residual(tensors, block, params, stats, path):
  """Their Residual (ReLU, conv3x3, BN, ReLU, conv1x1, BN) -> our AuthorsResBlock."""
  _put_conv(tensors, f'{block}.block.1', params, f'{path}/TorchConvBN_0/Conv_0')
  _put_batch_norm(tensors, f'{block}.block.2', params, stats, f'{path}/TorchConvBN_0/BatchNorm_0')
  _put_conv(tensors, f'{block}.block.4', params, f'{path}/TorchConvBN_1/Conv_0')
  _put_batch_norm(tensors, f'{block}.block.5', params, stats, f'{path}/TorchConvBN_1/BatchNorm_0')


def _walk(tensors, layers, plan, params, stats):
  """Maps their trunk layers onto our plan [(kind, our path)] in order."""
  if len(layers) != len(plan):
    raise ShapeMismatchError(
      f'Their {tensors.prefix} trunk has {len(layers)} layers with weights, our '
      f'{params.name} {len(plan)}: a model whose structure does not fit this configuration.'
    )
  for layer, (kind, path) in zip(layers, plan, strict=True):
    if kind == 'bn':
      _put_batch_norm(tensors, layer, params, stats, path)
    elif kind == 'res':
      _put_residual(tensors, layer, params, stats, path)
    elif kind.startswith('linear'):
      _put_linear(tensors, layer, params, path, chw=_plan_chw(kind))
    else:
      _put_conv(tensors, layer, params, path, kind)


def _plan_chw(kind: str):
  """'linear:C,H,W' -> (C, H, W) of the NCHW map it flattens; 'linear' -> None."""
  if ':' not in kind:
    return None
  return tuple(int(x) for x in kind.split(':')[1].split(','))


def _conv_bn(index: int, kind: str = 'conv') -> list[tuple[str, str]]:
  sub = 'ConvTranspose_0' if kind == 'convT' else 'Conv_0'
  return [(kind, f'TorchConvBN_{index}/{sub}'), ('bn', f'TorchConvBN_{index}/BatchNorm_0')]


def encoder_variables(state, model: npdraw.NPDraw, abstract: dict) -> dict:
  """Their encoder.* -> our encoder {'params', 'batch_stats'}."""
  tensors = _Tensors(state, 'encoder.')
  params = _Target(abstract['params'], 'encoder params')
  stats = _Target(abstract['batch_stats'], 'encoder batch_stats')
  encoder = model.encoder
  layers = _trunk_layers(tensors, 'embed.')
  if encoder.head == 'mlp':
    # 4 stride-2 convs from the image side: 28 -> 14 -> 7 -> 4 -> 2.
    side = model.image_size
    for _ in range(4):
      side = (side - 1) // 2 + 1
    plan = [*(x for i in range(4) for x in _conv_bn(i))]
    plan.append((f'linear:{encoder.features},{side},{side}', 'Dense_0'))
    _walk(tensors, layers, plan, params, stats)
    for theirs, ours in (('head_cls', 'what'), ('head_loc', 'where')):
      _put_linear(tensors, f'{theirs}.0', params, f'{ours}_hidden')
      _put_linear(tensors, f'{theirs}.2', params, ours)
    _put_linear(tensors, 'head_stop.0', params, 'pres')
  else:
    plan = [
      *_conv_bn(0),
      *_conv_bn(1),
      *_conv_bn(2),
      ('res', 'AuthorsResBlock_0'),
      ('res', 'AuthorsResBlock_1'),
      ('conv', 'Conv_0'),
      *_conv_bn(3),
    ]
    _walk(tensors, layers, plan, params, stats)
    for theirs, ours in (
      ('head_cls.0', 'what'),
      ('head_loc.0', 'where'),
      ('head_stop.0.0', 'pres'),
    ):
      _put_conv(tensors, theirs, params, ours)
  tensors.check_all_taken()
  return {'params': params.tree(), 'batch_stats': stats.tree()}


def output_channel_order(likelihood: str, channels: int, num_mixtures: int) -> np.ndarray:
  """order[j]: their decoder output channel that our channel j is (distributions.py layouts).

  Theirs: logistic [C, 2] (mean, log-scale per channel, Base.out2sampled and
  get_prepost_pross' view); mixture_logistic the dmol layout (logits [M], then
  means, log-scales and coefficients each [M, C]). Ours: logistic [2, C];
  mixture logits [M], then [C, 3, M].
  """
  if likelihood == 'bernoulli':
    return np.arange(channels)
  if likelihood == 'logistic':
    return np.array([c * 2 + field for field in range(2) for c in range(channels)])
  if channels != 3:
    raise ShapeMismatchError(
      f'Their mixture of logistics is for colour images only, not {channels} channel(s).'
    )
  m = num_mixtures
  rest = [
    m + field * channels * m + k * channels + c
    for c in range(channels)
    for field in range(3)
    for k in range(m)
  ]
  return np.array([*range(m), *rest])


def decoder_variables(state, model: npdraw.NPDraw, abstract: dict) -> dict:
  """Their decoder.* -> our decoder {'params', 'batch_stats'}, output channels reordered."""
  tensors = _Tensors(state, 'decoder.')
  params = _Target(abstract['params'], 'decoder params')
  stats = _Target(abstract['batch_stats'], 'decoder batch_stats')
  plan = [
    *_conv_bn(0),
    *_conv_bn(1),
    ('res', 'AuthorsResBlock_0'),
    ('res', 'AuthorsResBlock_1'),
    *_conv_bn(2, 'convT'),
    *_conv_bn(3, 'convT'),
  ]
  output = 'Conv_0'
  if model.decoder.upsample == 2:
    plan += [*_conv_bn(4, 'convT'), ('conv', 'Conv_0')]
    output = 'Conv_1'
  layers = _trunk_layers(tensors, 'generative_pxh.')
  _walk(tensors, layers[:-1], plan, params, stats)
  order = output_channel_order(model.likelihood, model.channels, model.num_mixtures)
  their_out = tensors.shape(f'{layers[-1]}.weight')[:1] if layers else ()
  if their_out != (len(order),):
    raise ShapeMismatchError(
      f'Their decoder outputs {their_out[0] if their_out else 0} channels, our '
      f'{model.likelihood} likelihood needs '
      f'{len(order)}: a dataset whose shapes do not fit this configuration.'
    )
  _put_conv(tensors, layers[-1], params, output, kernel_map=lambda k: k[..., order])
  tensors.check_all_taken()
  return {'params': params.tree(), 'batch_stats': stats.tree()}


def prior_params(state, model: npdraw.NPDraw, abstract: dict, canvas_size: int) -> dict:
  """Their prior_model.* -> our AuthorsPrior params."""
  tensors = _Tensors(state, 'prior_model.')
  params = _Target(abstract, 'prior params')
  prior = model.prior
  _put_conv(tensors, 'preprocess.0', params, 'token_cnn/Conv_0')
  _put_conv(tensors, 'preprocess.2', params, 'token_cnn/Conv_1')
  side = (canvas_size - 1) // 2 + 1
  chw = (prior.token_features, side, side)
  _put_linear(tensors, 'enc.patch_to_embedding', params, 'token_cnn/Dense_0', chw=chw)
  params.put('position_embedding', tensors.take('enc.pos_embedding')[0], 'enc.pos_embedding')
  params.put('class_token', tensors.take('enc.cls_token')[0, 0], 'enc.cls_token')
  heads, head_dim = prior.num_heads, prior.head_dim
  for i in range(prior.num_layers):
    layer, ours = f'enc.transformer.layers.{i}', f'blocks_{i}'
    for j in range(2):
      norm = f'{layer}.{j}.fn.norm'
      params.put(f'{ours}/LayerNorm_{j}/scale', tensors.take(f'{norm}.weight'), f'{norm}.weight')
      params.put(f'{ours}/LayerNorm_{j}/bias', tensors.take(f'{norm}.bias'), f'{norm}.bias')
    qkv = tensors.take(f'{layer}.0.fn.fn.to_qkv.weight')
    if qkv.shape[0] != 3 * heads * head_dim:
      raise ShapeMismatchError(
        f'Their prior attention is {qkv.shape[0] // 3} wide, ours {heads} x {head_dim}: a model '
        'whose shapes do not fit this configuration.'
      )
    attention = f'{ours}/CausalSelfAttention_0'
    for name, rows in zip(('query', 'key', 'value'), np.split(qkv, 3), strict=True):
      kernel = rows.T.reshape(-1, heads, head_dim)  # Their (h d) rows, h major.
      params.put(f'{attention}/{name}/kernel', kernel, f'{layer}.0.fn.fn.to_qkv.weight')
    out = tensors.take(f'{layer}.0.fn.fn.to_out.0.weight')
    params.put(f'{attention}/out/kernel', out.T.reshape(heads, head_dim, -1), f'{layer} to_out')
    params.put(
      f'{attention}/out/bias', tensors.take(f'{layer}.0.fn.fn.to_out.0.bias'), f'{layer} to_out'
    )
    _put_linear(tensors, f'{layer}.1.fn.fn.net.0', params, f'{ours}/Dense_0')
    _put_linear(tensors, f'{layer}.1.fn.fn.net.3', params, f'{ours}/Dense_1')
  # compute_q_dist: one head per output, in the order of their sample (what, where, pres).
  for index, head in enumerate(('what_head', 'where_head', 'pres_head')):
    _put_linear(tensors, f'compute_q_dist.layers.{index}.0', params, f'{head}/Dense_0')
    _put_linear(tensors, f'compute_q_dist.layers.{index}.2', params, f'{head}/Dense_1')
  tensors.check_all_taken()
  return params.tree()


# Their model's tensors that are no network weight: the Gumbel temperature they anneal.
_NOT_WEIGHTS = ('temp', 'temp_init')


def convert_variables(state: dict[str, np.ndarray], model: npdraw.NPDraw) -> dict:
  """Their state_dict -> {'params': {encoder, decoder, prior}, 'batch_stats': {encoder, decoder}}.

  Every tensor of theirs fills exactly one of our leaves (or is one of
  _NOT_WEIGHTS, or a batch norm's step count), every leaf of ours is filled,
  and every shape fits: otherwise a ShapeMismatchError names the first misfit.
  """
  state = {k.removeprefix('module.'): v for k, v in state.items()}
  known = ('encoder.', 'decoder.', 'prior_model.')
  stray = [k for k in state if not k.startswith(known) and k not in _NOT_WEIGHTS]
  if stray:
    raise ShapeMismatchError(
      f'Their checkpoint holds {", ".join(stray[:4])}, which no network of ours has: not their '
      'stage-2 model (cat_vloc_at), or one whose structure does not fit.'
    )
  abstract = jax.eval_shape(lambda: npdraw.init_variables(model, jax.random.key(0)))
  part = lambda name: {c: abstract[c][name] for c in ('params', 'batch_stats')}
  encoder = encoder_variables(state, model, part('encoder'))
  decoder = decoder_variables(state, model, part('decoder'))
  prior = prior_params(state, model, abstract['params']['prior'], model.grid.canvas_size)
  return {
    'params': {'encoder': encoder['params'], 'decoder': decoder['params'], 'prior': prior},
    'batch_stats': {'encoder': encoder['batch_stats'], 'decoder': decoder['batch_stats']},
  }


# --- The run directory ----------------------------------------------------------------


def _refuse_existing(workdir: str) -> None:
  for stage in (run_dir.PRIOR_DIR, run_dir.VAE_DIR):
    path = os.path.join(workdir, stage)
    if os.path.exists(path):
      raise errors.ConfigError(
        f'{path} exists: convert into a new --workdir (or delete {path} and the stages after it).'
      )


def _save_state(checkpoints: checkpointing.Checkpoints, step: int, state) -> None:
  checkpoints.save(step, state, force=True)
  checkpoints.close()


def write_run(
  config: ml_collections.ConfigDict, workdir: str, variables: dict, parts: np.ndarray, release
) -> dict:
  """Writes the run directory (bank, parses, prior, vae, record); returns the record."""
  workdir = os.path.abspath(workdir)
  _refuse_existing(workdir)
  os.makedirs(workdir, exist_ok=True)
  model = npdraw.make_model(config)
  grid = model.grid
  bank = partbank.PartBank(
    parts=parts,
    counts=np.zeros(len(parts), np.int64),  # Unknown: their bank comes without counts.
    inertia=0.0,
    num_patches=0,
    iterations=0,
    settings=bank_parse.bank_settings(config),
  )
  run_dir.save_bank(workdir, bank)
  columns = int(np.ceil(np.sqrt(len(parts))))
  pictures.save_grid(os.path.join(workdir, run_dir.BANK_PICTURE), parts, columns, scale=8)
  logging.info('Parsing the configured data with their part bank (the parse stage).')
  parses = bank_parse.run_parse(config, workdir)

  # Before any checkpoint is written: a batch larger than the data fails here.
  vae_step = train_vae.num_train_steps(config, len(parses['train_pres']))
  p = config.prior
  schedule = training.warmup_decay_schedule(p.lr, p.warmup_steps, p.train_steps)
  prior_state = train_prior.make_init_fn(config, model.prior, schedule)()
  prior_state = prior_state.replace(step=p.train_steps, params=variables['params']['prior'])
  _save_state(train_prior.open_checkpoints(config, workdir, grid), p.train_steps, prior_state)

  vae_state = train_vae.make_init_fn(config, model, variables['params']['prior'])()
  vae_state = vae_state.replace(
    step=vae_step, params=variables['params'], batch_stats=variables['batch_stats']
  )
  _save_state(train_vae.open_checkpoints(config, workdir), vae_step, vae_state)

  record = {
    'checkpoint': os.path.abspath(release.checkpoint),
    'prior_dir': os.path.abspath(release.prior_dir),
    'their_dataset': release.cfg['dataset'],
    'their_epoch': release.epoch,
    'their_best_epoch': release.best_epoch,
    'their_test_loss': release.test_loss,
    'prior_step': p.train_steps,
    'vae_step': vae_step,
  }
  artifacts.save_json(os.path.join(workdir, RECORD_FILE), record)
  return record


def convert(
  authors_dir: str,
  workdir: str,
  config: ml_collections.ConfigDict | None = None,
  checkpoint: str | None = None,
  prior_dir: str | None = None,
) -> dict:
  """Reads their experiment, checks it against the configuration (their dataset's
  reference config when None) and writes the run directory; returns its record."""
  release = read_release(authors_dir, checkpoint, prior_dir)
  if config is None:
    config = reference_config(release.cfg)
  check_config(release, config)
  parts = read_part_bank(release.prior_dir, config)
  check_location_table(release.prior_dir, config)
  variables = convert_variables(release.state, npdraw.make_model(config))
  return write_run(config, workdir, variables, parts, release)


# --- Command line ---------------------------------------------------------------------


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing defines none)."""
  flags.DEFINE_string(
    'authors_dir', None, 'Their experiment folder, its .pth, or the unzipped release root.'
  )
  flags.DEFINE_string('workdir', None, 'The npdraw-jax run directory to write.')
  flags.DEFINE_string(
    'checkpoint', None, 'Which .pth under --authors_dir (e.g. E00550.pth) when there are several.'
  )
  flags.DEFINE_string(
    'prior_dir', None, "Their prior folder (default: found from the checkpoint's cfg.prior_weight)."
  )
  config_flags.DEFINE_config_file(
    'config',
    None,
    "Our configuration (default: configs/ of their dataset's reference).",
    lock_config=True,
  )
  flags.mark_flags_as_required(['authors_dir', 'workdir'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  record = convert(f.authors_dir, f.workdir, f.config, f.checkpoint, f.prior_dir)
  logging.info(
    'Converted %s (their epoch %d) into %s: prior at step %d, VAE at step %d. Evaluate it with '
    'python -m experiments.<dataset> --workdir=%s --stages=eval (and the same --config).',
    record['checkpoint'],
    record['their_epoch'],
    os.path.abspath(f.workdir),
    record['prior_step'],
    record['vae_step'],
    f.workdir,
  )


if __name__ == '__main__':
  # The house command line (a user error is one line), and Orbax's per-save
  # lines dropped as the experiments' launcher drops them.
  from experiments import launch

  logging.get_absl_handler().addFilter(launch.QuietCheckpointer())
  launch.run_app(main, define_flags)
