"""The importance-weighted bound (model/bound.py) over a whole split, jitted and
sharded: the one scorer of stage 2's held-out check, the eval stage and the
baseline VAE."""

import collections
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from npdraw_jax import errors
from npdraw_jax.infra import input_pipeline, interrupt, sharding
from npdraw_jax.model import bound, npdraw


def make_eval_step(
  model: npdraw.NPDraw,
  mesh,
  sample_counts: tuple[int, ...],
  chunk_size: int,
  authors_samples: int = 0,
):
  """Jitted (variables, bank, batch, key) -> per-image bounds and 'mask' [B].

  The bounds of bound.iwae_bounds at sample_counts; with authors_samples =
  S > 0 also f'nll_authors_{S}' (from the first S of the same samples). At
  most chunk_size samples per pass. The outputs are replicated so that every
  process sees the whole global batch.
  """
  if authors_samples < 0:
    raise errors.ConfigError(
      f'eval.authors_samples must be 0 (off) or positive, got {authors_samples}.'
    )
  num_samples = bound.samples_drawn(sample_counts, authors_samples)
  field = 'eval.authors_samples' if authors_samples > max(sample_counts) else 'eval.iwae_samples'
  chunk = bound.sample_chunk(num_samples, chunk_size, field)

  def eval_step(variables, bank, batch, key):
    out = bound.iwae_bounds(
      model, variables, bank, batch['image'], key, sample_counts, chunk, authors_samples
    )
    return {**out, 'mask': batch['mask']}

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(
    eval_step, in_shardings=(replicated, replicated, batched, replicated), out_shardings=replicated
  )


def test_bounds(
  config: ml_collections.ConfigDict,
  test: input_pipeline.Split,
  mesh,
  bounds_fn: Callable[[dict, jax.Array], dict],
  is_8bit: bool,
  description: str = '',
  stoppable: bool = False,
) -> dict[str, float]:
  """The summary (see summarise) of per-image bounds over the whole split `test`
  (the test split or the held-out one, whole on every process: each process
  serves its part of each global batch, and every process gets every bound).

  bounds_fn(global batch {'image', 'mask'}, key) -> per-image bounds and 'mask',
  replicated; eval_batches binarises the images alike for every model and every
  call, and the keys are the same at every call (a fair comparison of
  checkpoints). description: the progress bar's, by default the eval's S.
  stoppable: a stop signal (infra/interrupt.py) raises errors.Interrupted after
  the batch in progress (the eval stage; stage 2's held-out check runs to its
  end, so that the step it scores is saved).
  """
  batch_size = config.eval.batch_size
  sharding.check_batch_size(batch_size, 'eval.batch_size')
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  per_image = collections.defaultdict(list)
  batches = input_pipeline.eval_batches(
    test, config.data, batch_size, config.seed, jax.process_index(), jax.process_count()
  )
  num_batches = -(-test.num_examples // batch_size)
  description = description or f'eval (S = {", ".join(map(str, bound.iwae_sample_counts(config)))})'
  for b, batch in enumerate(tqdm(batches, total=num_batches, desc=description, unit='batch')):
    if stoppable:
      interrupt.stop_if_requested(f'{description}: interrupted at batch {b}, nothing recorded')
    batch = sharding.to_global({'image': batch['image'], 'mask': batch['mask']}, mesh)
    bounds = jax.device_get(bounds_fn(batch, jax.random.fold_in(key, b)))
    mask = bounds.pop('mask')
    for name, values in bounds.items():
      per_image[name].append(values[mask])
  per_image = {k: np.concatenate(v) for k, v in per_image.items()}
  image_dims = config.data.image_size**2 * config.data.channels
  return bound.summarise(per_image, image_dims, is_8bit)
