"""Stage-2 (encoder + decoder against the frozen prior) train step: speed, memory, FLOPs, variants.

The state is built as train_vae builds it, the step is train_vae.make_train_step
(compiled ahead of time, so compile time is apart), the batch is random
images with random parses and the part bank random. Variants of the step
(the kernel forms, one platform kernel at a time, the renderer, the compute
dtype) are compiled side by side and timed in turn in one process; `breakdown`
times the step's parts.
"""

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from unittest import mock

import flax.linen
import jax
import jax.extend
import jax.interpreters.mlir
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from benchmarks import timing
from npdraw_jax.infra import sharding, training
from npdraw_jax.model import canvas, npdraw, platform_kernels
from npdraw_jax.stages import train_vae


def lax_conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """What flax's nn.ConvTranspose computes: one input-dilated convolution."""
  dims = ('NHWC', 'HWIO', 'NHWC')
  return jax.lax.conv_transpose(x, kernel, (stride, stride), 'SAME', dimension_numbers=dims)


def lax_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  """A stride-1 NHWC/HWIO convolution as XLA runs it."""
  dims = ('NHWC', 'HWIO', 'NHWC')
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=dims)


def xla_convolutions() -> contextlib.ExitStack:
  """The 'cpu' form's stride1_conv, pointwise_conv and 1x1 nn.Conv as plain lax convolutions."""
  patches = contextlib.ExitStack()
  patches.enter_context(
    mock.patch.object(platform_kernels, 'pointwise_conv', lambda x, k: lax_conv(x, k, 'VALID'))
  )
  patches.enter_context(mock.patch.object(platform_kernels, 'stride1_conv', lax_conv))
  patches.enter_context(
    mock.patch.object(platform_kernels, 'matmul_conv_general_dilated', jax.lax.conv_general_dilated)
  )
  return patches


def pointwise_in_turn(x: jax.Array, first: tuple, second: tuple, dtype, form: str) -> jax.Array:
  """What the 'cpu' form of pointwise_pair replaces: the two 1x1 convolutions (as matmuls)
  one after the other."""
  del form
  for kernel, bias in (first, second):
    x = platform_kernels.pointwise_conv(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
  return x


def every_canvas_then_the_last(grid, bank, pres, where, what, where_gradient=True, kernels='cpu'):
  """What canvas.render_relaxed replaces: every canvas of the drawing rendered, the last used."""
  del kernels
  return canvas.render_relaxed_steps(grid, bank, pres, where, what, where_gradient)[0][:, -1]


# The alternatives to what the model uses in the 'cpu' kernel form (or, for the
# renderer and the final canvas, in either form), patched in while a step is traced.
BASELINES = {
  'renderer: `place` einsum': lambda: mock.patch.object(
    canvas, 'place_straight_through', canvas.place
  ),
  'transposed conv: lax.conv_transpose': lambda: mock.patch.object(
    platform_kernels, 'phase_conv_transpose', lax_conv_transpose
  ),
  "convolutions: XLA's": xla_convolutions,
  'transposed conv, kernel = stride: one matmul per phase': lambda: mock.patch.object(
    platform_kernels, 'pointwise_phases', platform_kernels.phase_convolutions
  ),
  'two 1x1 convolutions in turn (not folded)': lambda: mock.patch.object(
    platform_kernels, 'pointwise_pair', pointwise_in_turn
  ),
  'beta = 0: every canvas rendered, the last one used': lambda: mock.patch.object(
    canvas, 'render_relaxed', every_canvas_then_the_last
  ),
  '1x1 convolutions: lax convolutions': lambda: mock.patch.object(
    platform_kernels,
    'pointwise_conv',
    lambda x, k: platform_kernels.stride1_conv(x, k, ((0, 0), (0, 0))),
  ),
  'dropout: jax.random.bernoulli (threefry loop)': lambda: mock.patch.object(
    platform_kernels, 'fused_bits_supported', lambda key, shape: False
  ),
  'GELU: nn.gelu (erfc)': lambda: mock.patch.object(
    platform_kernels, 'exact_gelu', lambda x, form: flax.linen.gelu(x, approximate=False)
  ),
  'attention: heads not folded': lambda: mock.patch.object(
    platform_kernels, 'folds_heads', lambda width, head_dim, form: False
  ),
}


def random_batch(config, num_locations: int, batch: int) -> dict:
  """Images in [0, 1] (binary for Bernoulli data) and parse-like sequences."""
  rng = np.random.default_rng(0)
  side, channels, steps = config.data.image_size, config.data.channels, config.model.T
  images = rng.random((batch, side, side, channels), dtype=np.float32)
  if config.model.likelihood == 'bernoulli':
    images = (images < 0.2).astype(np.float32)
  else:
    images = np.round(images * 255) / 255
  return {
    'image': images,
    'pres': rng.random((batch, steps)) < 0.8,
    'where': rng.integers(0, num_locations, (batch, steps), dtype=np.int32),
    'what': rng.integers(0, config.model.K, (batch, steps), dtype=np.int32),
  }


@dataclasses.dataclass
class CompiledStep:
  """One compiled stage-2 step and XLA's account of it.

  Attributes:
    run: runs one step (continuing from the last) and returns its metrics.
    compile_s: seconds to lower and compile.
    xla_bytes: arguments + outputs + temporaries of the compiled step.
    flops: XLA's cost analysis of the compiled step.
  """

  run: Callable[[], dict]
  compile_s: float
  xla_bytes: int | None
  flops: float | None


def _flops(compiled) -> float | None:
  # A dict in jax 0.10; older versions return a list with one dict per program.
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  return None if not cost else cost.get('flops')


@functools.cache
def compile_step(
  get_config: Callable,
  batch_size: int,
  baselines: tuple[str, ...] = (),
  compute_dtype: str = 'float32',
  kernels: str = 'auto',
) -> CompiledStep:
  """The stage-2 step of a configuration at a global batch size, with baselines patched in.

  Cached, so the throughput rows and the comparisons share compiled steps.
  """
  config = get_config()
  config.vae.batch_size = batch_size
  config.model.compute_dtype = compute_dtype
  config.model.kernels = kernels
  sharding.check_batch_size(batch_size, 'vae.batch_size')
  mesh = sharding.make_mesh()
  with contextlib.ExitStack() as patches:
    for baseline in baselines:
      patches.enter_context(BASELINES[baseline]())
    model = npdraw.make_model(config)
    # No trained prior: the init draws fresh prior parameters.
    state = training.init_replicated(train_vae.make_init_fn(config, model, None), mesh)
    train_step = train_vae.make_train_step(model, config, mesh, steps_per_epoch=100)
    p, c = config.model.patch_size, config.data.channels
    bank = sharding.replicate(
      np.random.default_rng(1).random((config.model.K, p, p, c), dtype=np.float32), mesh
    )
    batch = sharding.to_global(random_batch(config, model.grid.num_locations, batch_size), mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, bank, batch).compile()
    compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_bytes = None
  if memory is not None:
    xla_bytes = (
      memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    )

  def run():
    # The step donates its state, so each call continues from the last one's.
    nonlocal state
    state, metrics = compiled(state, bank, batch)
    return metrics

  return CompiledStep(run, compile_s, xla_bytes, _flops(compiled))


def _checked_first_step(label: str, step: CompiledStep) -> float:
  """Runs the first step (untimed warm-up); its seconds. Fails on a non-finite loss."""
  timed = timing.time_call(step.run, repeats=0)
  loss = float(timed['output']['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{label}: non-finite loss {loss}.')
  return timed['compile_s']


def measure(name: str, get_config, batch_size: int, steps: int, budget_s: float) -> dict:
  """Compile time, first step, median of up to `steps` timed steps, memory and FLOPs."""
  label = f'stage 2, {name}, batch {batch_size}'
  step = compile_step(get_config, batch_size)
  logging.info('%s: compiled in %.1f s.', label, step.compile_s)
  first_s = _checked_first_step(label, step)
  seconds = timing.alternate({'step': step.run}, steps, budget_s)['step']
  logging.info('%s: first step %.1f s, then %s', label, first_s, seconds)
  stats = jax.devices()[0].memory_stats() or {}
  config = get_config()
  side, channels = config.data.image_size, config.data.channels
  return {
    'name': name,
    'batch': batch_size,
    'image': f'{side}x{side}x{channels}',
    'compile_s': step.compile_s,
    'first_s': first_s,
    'seconds': seconds,
    'median_s': float(np.median(seconds)),
    'xla_bytes': step.xla_bytes,
    'device_peak_bytes': stats.get('peak_bytes_in_use'),
    'flops': step.flops,
  }


def compare(
  name: str, get_config, batch_size: int, variants: dict, rounds: int, budget_s: float
) -> dict:
  """Variants of one step, compiled side by side and timed in turn.

  Args:
    name: the configuration's name.
    get_config: its get_config.
    batch_size: global batch.
    variants: label -> keyword arguments of compile_step.
    rounds: timed steps per variant at most.
    budget_s: per-variant time budget of the timed steps (see timing.alternate).

  Returns:
    {'name', 'batch', 'seconds': label -> timed seconds, 'compile_s': label -> seconds}.
  """
  steps = {}
  for label, kwargs in variants.items():
    steps[label] = compile_step(get_config, batch_size, **kwargs)
    _checked_first_step(f'{name}, batch {batch_size}, {label}', steps[label])
  seconds = timing.alternate({k: s.run for k, s in steps.items()}, rounds, budget_s)
  logging.info('%s, batch %d variants: %s', name, batch_size, seconds)
  return {
    'name': name,
    'batch': batch_size,
    'seconds': seconds,
    'compile_s': {k: s.compile_s for k, s in steps.items()},
  }


def _pairing_gradient(fn: Callable, argnums) -> Callable:
  """(args..., cotangent) -> the gradient of <fn(args...), cotangent>: fn's forward and backward."""

  def pairing(*args):
    *inputs, cotangent = args
    products = jax.tree.map(lambda y, c: jnp.vdot(y, c), fn(*inputs), cotangent)
    return sum(jax.tree.leaves(products))

  return jax.grad(pairing, argnums)


def part_calls(get_config: Callable, batch_size: int) -> dict[str, tuple[Callable, tuple]]:
  """The stage-2 step cut into its parts: name -> (jitted function, arguments).

  Each part runs forward and backward as the step does (gradients only where
  the step takes them), on the intermediates of one eager run of the loss on a
  random batch; the cotangents are random.
  """
  config = get_config()
  config.vae.batch_size = batch_size
  model = npdraw.make_model(config)
  kernels = platform_kernels.resolve(config.model.kernels)
  weights = npdraw.LossWeights.from_config(config.vae)
  variables = npdraw.init_variables(model, jax.random.key(0))
  params, stats = variables['params'], variables['batch_stats']
  p, c = config.model.patch_size, config.data.channels
  bank = jnp.asarray(np.random.default_rng(1).random((config.model.K, p, p, c), np.float32))
  batch = jax.tree.map(jnp.asarray, random_batch(config, model.grid.num_locations, batch_size))
  k_noise, k_dropout = jax.random.split(jax.random.key(2))
  tau, rho = 1.0, 0.5
  cotangent = lambda tree: jax.tree.map(
    lambda x: jax.random.normal(jax.random.key(3), x.shape, x.dtype), tree
  )

  def encoder(encoder_params, images):
    return npdraw.encode(
      model, {'params': {'encoder': encoder_params}, 'batch_stats': stats}, images, True
    )[0]

  def render(q):
    noise = npdraw.draw_stage2_noise(k_noise, q)
    sampled = npdraw.relaxed_latents(
      noise, q, tau, weights.what_straight_through, weights.pres_relaxed
    )
    parse = npdraw.forcing_latents(
      batch['pres'],
      batch['where'],
      batch['what'],
      model.grid.num_locations,
      bank.shape[0],
      weights.forcing_undrawn,
    )
    latents = npdraw.teacher_force(noise.forcing, rho, sampled, parse, weights.teacher_forcing_pres)
    args = (model.grid, bank, latents.pres, latents.where, latents.what)
    straight_through = weights.where_gradient == 'straight_through'
    if weights.beta == 0:  # As the step: the final canvas alone.
      return (canvas.render_relaxed(*args, straight_through, kernels),), latents.pres
    canvases, maps = canvas.render_relaxed_steps(*args, straight_through, model.prior.history)
    return (canvases[:, -1], canvases, maps), latents.pres

  def prior(history):
    return model.prior.apply(
      {'params': params['prior']},
      *history,
      jnp.arange(config.model.T),
      train=weights.prior_dropout,
      rngs={'dropout': k_dropout},
    )

  def decoder(decoder_params, canvas_t):
    return npdraw.decode(
      model, {'params': {'decoder': decoder_params}, 'batch_stats': stats}, canvas_t, True
    )[0]

  def heads(out, q, p, pres):
    recon = npdraw.reconstruction_loss(model, out, batch['image'])
    loss = recon + weights.lambda_sup * npdraw.parse_supervision(
      q, batch['pres'], batch['where'], batch['what']
    )
    if p is not None:
      loss = loss + weights.beta * npdraw.prior_kl(q, p, pres)
    return jnp.mean(loss)

  q = jax.jit(encoder)(params['encoder'], batch['image'])
  rendered, pres = jax.jit(render)(q)
  final_canvas = rendered[0]
  out = jax.jit(decoder)(params['decoder'], final_canvas)
  calls = {
    'encoder': (_pairing_gradient(encoder, 0), (params['encoder'], batch['image'], cotangent(q))),
    'latents + rendering': (
      _pairing_gradient(lambda q: render(q)[0], 0),
      (q, cotangent(rendered)),
    ),
  }
  p = None
  if weights.beta != 0:
    history = canvas.states_before(*rendered[1:])
    p = jax.jit(prior)(history)
    if weights.kl_through_history:
      calls['prior, forward + input gradient'] = (
        _pairing_gradient(prior, 0),
        (history, cotangent(p)),
      )
    else:
      calls['prior, forward'] = (prior, (history,))
  calls['decoder'] = (
    _pairing_gradient(decoder, (0, 1)),
    (params['decoder'], final_canvas, cotangent(out)),
  )
  calls['likelihood, KL, supervision'] = (jax.grad(heads, (0, 1, 2)), (out, q, p, pres))
  tx = train_vae.make_optimizer(config)
  state = train_vae.create_state(variables, tx, jax.random.key(4))
  grads = cotangent(params)

  def optimizer(state, grads):
    return state.apply_gradients(grads=grads), optax.tree.norm(grads)

  calls['optimizer'] = (optimizer, (state, grads))
  return {name: (jax.jit(fn), args) for name, (fn, args) in calls.items()}


def breakdown(get_config: Callable, batch_size: int, rounds: int, budget_s: float) -> list[dict]:
  """Seconds (medians, timed in turn with the whole step) and XLA's FLOPs of each part.

  Returns:
    [{'part', 'seconds', 'median_s', 'flops'}], the parts then 'whole step'.
  """
  runs, flops = {}, {}
  for name, (fn, args) in part_calls(get_config, batch_size).items():
    compiled = fn.lower(*args).compile()
    runs[name] = functools.partial(compiled, *args)
    flops[name] = _flops(compiled)
    jax.block_until_ready(runs[name]())
  step = compile_step(get_config, batch_size)
  _checked_first_step('breakdown', step)
  runs['whole step'], flops['whole step'] = step.run, step.flops
  seconds = timing.alternate(runs, rounds, budget_s)
  return [
    {'part': k, 'seconds': s, 'median_s': float(np.median(s)), 'flops': flops[k]}
    for k, s in seconds.items()
  ]
