"""Every benchmark of npdraw-jax, written down as one dated section of RESULTS.md.

  python -m benchmarks.run [--quick] [--only=stage2,prior,sampling,parse,kernels,variants,dtype]

Measures on whatever devices JAX sees, at the MNIST and CelebA configurations:
  stage2    stage-2 train step at the reference configurations (the authors'
            networks) and with our networks: images/s, compile time, memory, its
            achieved FLOP/s (XLA's cost analysis) against a float32 matmul timed
            in this run, and the seconds and FLOPs of each part of the step;
  prior     stage-1 prior train step: images/s;
  sampling  cached against naive O(T^2) prior sampling (T = 36, 64);
  parse     part bank and raster parser over MNIST-sized images;
  kernels   the stage-2 and prior steps in both forms of config.model.kernels
            ('cpu' and 'plain', npdraw_jax/model/platform_kernels.py), side by side;
  variants  the stage-2 step with the 'cpu' form's convolutions, attention,
            dropout and GELU and the model's renderer against their
            alternatives, one at a time, in turn in one process;
  dtype     (GPU/TPU only) the stage-2 step in float32 against bfloat16 compute.
Comparisons are ratios measured in one run, because shared machines are noisy.
--quick uses small batches, few steps and 10,000 images: minutes on a 2-core CPU.
"""

import dataclasses
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import partbank_parse, prior_train, results, sampling, timing, vae_train
from configs import celeba, mnist
from npdraw_jax.model import platform_kernels

ITEMS = ('stage2', 'prior', 'sampling', 'parse', 'kernels', 'variants', 'dtype')
_QUICK = flags.DEFINE_bool('quick', False, 'Small batches and few steps (minutes on a CPU).')
_ONLY = flags.DEFINE_list('only', list(ITEMS), f'Benchmarks to run, of {", ".join(ITEMS)}.')
_RESULTS = flags.DEFINE_string('results', results.RESULTS_FILE, 'Markdown file to append to.')

CONFIGS = {'MNIST': mnist.get_config, 'CelebA': celeba.get_config}
REFERENCE = None  # In a batch list: the configuration's own (reference) batch size.


def _with(get_config, **fields):
  """get_config with some 'section.field' values changed.

  Made once per name at import, so vae_train.compile_step's cache sees one function each.
  """

  def changed():
    config = get_config()
    for name, value in fields.items():
      section, field = name.split('.')
      config[section][field] = value
    return config

  return changed


# This project's earlier networks, beside the authors' (the reference configurations).
OUR_NETWORKS = {
  'model.networks': 'ours',
  'prior.token_features': 32,
  'prior.d_model': 256,
  'prior.num_layers': 4,
  'prior.num_heads': 4,
  'prior.head_dim': 0,
  'prior.mlp_dim': 1024,
}
STAGE2_CONFIGS = {
  **CONFIGS,
  'MNIST, our nets': _with(
    mnist.get_config,
    **OUR_NETWORKS,
    **{'model.encoder_features': 64, 'model.decoder_features': 64},
  ),
  'CelebA, our nets': _with(
    celeba.get_config,
    **OUR_NETWORKS,
    **{'model.encoder_features': 128, 'model.decoder_features': 128},
  ),
}
# The renderer only matters where `where` gets the reconstruction's gradient.
STRAIGHT_THROUGH = {
  f'{name}, where straight-through': _with(get_config, **{'vae.where_gradient': 'straight_through'})
  for name, get_config in CONFIGS.items()
}
RENDERER = 'renderer: `place` einsum'
PRIOR_BASELINES = (
  'GELU: nn.gelu (erfc)',
  'attention: heads not folded',
  'dropout: jax.random.bernoulli (threefry loop)',
)
# Only stage 2 with beta = 0 renders the final canvas alone.
FINAL_CANVAS = 'beta = 0: every canvas rendered, the last one used'
# Layers only the decoder that upsamples the canvas 2x (CelebA) has.
UPSAMPLING_BASELINES = (
  'transposed conv, kernel = stride: one matmul per phase',
  'two 1x1 convolutions in turn (not folded)',
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one kind of run; budgets are seconds of timed calls per row."""

  stage2_batches: dict[str, tuple[int | None, ...]]
  stage2_steps: int
  stage2_budget_s: float
  breakdown_batches: dict[str, int]
  prior_batches: tuple[int | None, ...]
  prior_steps: int
  sample_batch: int
  sample_repeats: int
  naive_budget_s: float
  parse_images: int
  matmul_size: int
  variant_batches: dict[str, int]
  variant_rounds: int
  variant_budget_s: float


FULL = Settings(
  stage2_batches={
    'MNIST': (64, REFERENCE),
    'CelebA': (32, 64, REFERENCE),
    'MNIST, our nets': (64,),
    'CelebA, our nets': (32,),
  },
  stage2_steps=10,
  stage2_budget_s=120.0,
  breakdown_batches={'MNIST': 64, 'CelebA': 32},
  prior_batches=(64, REFERENCE),
  prior_steps=5,
  sample_batch=64,
  sample_repeats=3,
  naive_budget_s=100.0,
  parse_images=60_000,
  matmul_size=2048,
  variant_batches={'MNIST': 64, 'CelebA': 32},
  variant_rounds=5,
  variant_budget_s=120.0,
)
QUICK = Settings(
  stage2_batches={
    'MNIST': (16, 64),
    'CelebA': (4,),
    'MNIST, our nets': (16,),
    'CelebA, our nets': (4,),
  },
  stage2_steps=2,
  stage2_budget_s=15.0,
  breakdown_batches={'MNIST': 16, 'CelebA': 4},
  prior_batches=(64,),
  prior_steps=2,
  sample_batch=8,
  sample_repeats=2,
  naive_budget_s=10.0,
  parse_images=10_000,
  matmul_size=1024,
  variant_batches={'MNIST': 16, 'CelebA': 4},
  variant_rounds=2,
  variant_budget_s=10.0,
)

MODEL = 'model'
DTYPES = {'float32': {}, 'bfloat16': {'compute_dtype': 'bfloat16'}}  # {} shares the cached step.


def kernel_form_args(form: str) -> dict:
  """compile_step's arguments for a kernel form: {} (the cached step) for the one 'auto' picks."""
  return {} if platform_kernels.resolve('auto') == form else {'kernels': form}


def _on_accelerator() -> bool:
  return jax.devices()[0].platform != 'cpu'


def _gib(value) -> str:
  return 'n/a' if value is None else f'{value / 2**30:.2f}'


def _median(seconds: list[float]) -> float:
  return float(np.median(seconds))


def stage2_lines(settings: Settings) -> list[str]:
  """Items 1 and 5: the stage-2 step's throughput and memory, its FLOP/s, its parts."""
  rows = []
  for name, get_config in STAGE2_CONFIGS.items():
    reference = get_config().vae.batch_size
    for batch in dict.fromkeys(b or reference for b in settings.stage2_batches[name]):
      rows.append(
        vae_train.measure(name, get_config, batch, settings.stage2_steps, settings.stage2_budget_s)
      )
  peak = timing.matmul_flops_per_s(settings.matmul_size)
  memory_kind = (
    "device peak is the backend's peak_bytes_in_use for the whole process so far"
    if _on_accelerator()
    else 'no device peak on CPU'
  )
  lines = [
    '### Stage-2 train step',
    '',
    'Encoder, Gumbel latents, relaxed rendering, decoder, frozen-prior KL, parse '
    'supervision, backward, Adam; random data. Compile (lower + compile) apart; "first '
    'step" runs the compiled step once; then the median of the timed steps (fewer where '
    "their time budget ran out). Memory: XLA's memory analysis of the compiled step "
    f'(arguments + outputs + temporaries); {memory_kind}.',
    '',
    '| config | image | batch | compile (s) | first step (s) | timed steps | '
    's / step (median) | images/s | XLA memory (GiB) | device peak (GiB) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["name"]} | {row["image"]} | {row["batch"]} | {row["compile_s"]:.1f} | '
      f'{row["first_s"]:.2f} | {len(row["seconds"])} | {row["median_s"]:.3f} | '
      f'{timing.rate(row["batch"], row["median_s"])} | {_gib(row["xla_bytes"])} | '
      f'{_gib(row["device_peak_bytes"])} |'
    )
  lines += [
    '',
    '### Achieved FLOP/s of the stage-2 step',
    '',
    f"FLOPs per step from XLA's cost analysis of the compiled step; peak = best of 5 "
    f'float32 [{settings.matmul_size}, {settings.matmul_size}] matmuls on the same device in '
    f'this run ({peak / 1e9:,.1f} GFLOP/s).',
    '',
    '| config | batch | GFLOP / step | achieved GFLOP/s | utilisation of the matmul peak |',
    '|---|---|---|---|---|',
  ]
  for row in rows:
    if row['flops'] is None:
      lines.append(f'| {row["name"]} | {row["batch"]} | n/a | n/a | n/a |')
      continue
    achieved = row['flops'] / row['median_s']
    lines.append(
      f'| {row["name"]} | {row["batch"]} | {row["flops"] / 1e9:,.1f} | '
      f'{achieved / 1e9:,.2f} | **{achieved / peak:.1%}** |'
    )
  return lines + ['', *breakdown_lines(settings)]


def breakdown_lines(settings: Settings) -> list[str]:
  """The reference configurations' stage-2 step cut into parts (vae_train.breakdown)."""
  lines = [
    "### Where the stage-2 step's time goes",
    '',
    'Each part jitted on its own, forward and backward as in the step (gradients only '
    'where the step takes them), on intermediates of the same random batch; the parts and '
    "the whole step timed in turn in one process (medians). GFLOP: XLA's cost analysis of "
    'each part. The parts run apart, so their sum is not exactly the whole step.',
    '',
    '| config | batch | part | timed | s (median) | share of the step | GFLOP | GFLOP/s |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for name, batch in settings.breakdown_batches.items():
    rows = vae_train.breakdown(
      CONFIGS[name], batch, settings.stage2_steps, settings.stage2_budget_s
    )
    whole = rows[-1]['median_s']
    for row in rows:
      gflop = row['flops'] / 1e9 if row['flops'] is not None else float('nan')
      lines.append(
        f'| {name} | {batch} | {row["part"]} | {len(row["seconds"])} | {row["median_s"]:.3f} | '
        f'{row["median_s"] / whole:.0%} | {gflop:,.1f} | {gflop / row["median_s"]:,.1f} |'
      )
    parts_s = sum(row['median_s'] for row in rows[:-1])
    lines.append(
      f'| {name} | {batch} | sum of the parts | | {parts_s:.3f} | {parts_s / whole:.0%} | | |'
    )
  return lines


def prior_lines(settings: Settings) -> list[str]:
  """Item 2: the stage-1 train step."""
  rows = []
  for name, get_config in CONFIGS.items():
    reference = get_config().prior.batch_size
    for batch in dict.fromkeys(b or reference for b in settings.prior_batches):
      rows.append(prior_train.measure(name, get_config, batch, settings.prior_steps))
  return ['### Stage-1 prior train step', '', *prior_train.table(rows)]


def sampling_lines(settings: Settings) -> list[str]:
  """Item 3: cached against naive sampling."""
  rows = [
    sampling.measure(
      name, get_config, settings.sample_batch, settings.sample_repeats, settings.naive_budget_s
    )
    for name, get_config in CONFIGS.items()
  ]
  table = sampling.table(rows, settings.sample_batch, settings.sample_repeats)
  return ['### Prior sampling: cached against naive', '', *table]


def parse_lines(settings: Settings) -> list[str]:
  """Item 4: part bank and raster parse."""
  return ['### Part bank and parser', '', *partbank_parse.measure(settings.parse_images)]


def comparison_table(rows: list[dict], reference: str, ratio_label: str) -> list[str]:
  """Markdown for vae_train.compare rows: each variant's time over the reference's."""
  lines = [
    f'| config | batch | variant | compile (s) | timed steps | s / step (median) | images/s | '
    f'{ratio_label} |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    base = _median(row['seconds'][reference])
    for label, seconds in row['seconds'].items():
      median = _median(seconds)
      lines.append(
        f'| {row["name"]} | {row["batch"]} | {label} | {row["compile_s"][label]:.1f} | '
        f'{len(seconds)} | {median:.3f} | {timing.rate(row["batch"], median)} | '
        f'**{median / base:.2f}x** |'
      )
  return lines


def kernels_lines(settings: Settings) -> list[str]:
  """The stage-2 and prior steps in the 'cpu' and the 'plain' kernel forms."""
  auto = platform_kernels.resolve('auto')
  label = lambda form: f'{form} (auto here)' if form == auto else form
  rows = [
    vae_train.compare(
      name,
      get_config,
      settings.variant_batches[name],
      {label(form): kernel_form_args(form) for form in platform_kernels.FORMS},
      settings.variant_rounds,
      settings.variant_budget_s,
    )
    for name, get_config in CONFIGS.items()
  ]
  prior_rows = [
    prior_train.measure(
      f'{name}, {label(form)}',
      _with(get_config, **{'model.kernels': form}),
      settings.prior_batches[0] or get_config().prior.batch_size,
      settings.prior_steps,
    )
    for name, get_config in CONFIGS.items()
    for form in platform_kernels.FORMS
  ]
  return [
    "### Kernel forms: 'cpu' against 'plain'",
    '',
    "`config.model.kernels` (npdraw_jax/model/platform_kernels.py): 'cpu' computes transposed "
    'convolutions by output phase, 1x1 convolutions as matmuls, two 1x1 convolutions in '
    'a row as one, dropout masks as one fused threefry hash, attention on the folded '
    "per-head products, GELU with erf and the final canvas from the running maximum's "
    "last pairings; 'plain' runs flax's and lax's own operations. Same parameters, values "
    "to float32 round-off (tests/platform_kernels_test.py). 'auto' picks 'cpu' on a CPU "
    "backend, 'plain' on GPUs and TPUs: this table is what that choice rests on. Stage-2 "
    'steps timed in turn in one process:',
    '',
    *comparison_table(rows, label('cpu'), 's / step over cpu'),
    '',
    'Stage-1 prior train step in each form (one after the other):',
    '',
    *prior_train.table(prior_rows),
  ]


def variants_lines(settings: Settings) -> list[str]:
  """Item 6: the model's renderer, convolutions, attention and GELU against the alternatives."""
  rows = []
  for name, get_config in CONFIGS.items():
    # The reference renders without where's gradient; with beta = 0 (CelebA) no prior runs.
    labels = [label for label in vae_train.BASELINES if label != RENDERER]
    config = get_config()
    if config.vae.beta == 0:
      labels = [label for label in labels if label not in PRIOR_BASELINES]
    else:
      labels = [label for label in labels if label != FINAL_CANVAS]
    if config.data.image_size == config.data.canvas_size:
      labels = [label for label in labels if label not in UPSAMPLING_BASELINES]
    straight = f'{name}, where straight-through'
    groups = [(name, get_config, labels), (straight, STRAIGHT_THROUGH[straight], [RENDERER])]
    for group, group_config, group_labels in groups:
      # The baselines replace one 'cpu' form kernel each.
      cpu = kernel_form_args('cpu')
      variants = {
        MODEL: cpu,
        **{label: {**cpu, 'baselines': (label,)} for label in group_labels},
      }
      rows.append(
        vae_train.compare(
          group,
          group_config,
          settings.variant_batches[name],
          variants,
          settings.variant_rounds,
          settings.variant_budget_s,
        )
      )
  return [
    '### Variants in the stage-2 train step',
    '',
    f'"{MODEL}": the model in the \'cpu\' kernel form (`platform_kernels`): '
    '`phase_conv_transpose` (one stride-1 convolution '
    'per output phase; one matmul for all phases when the kernel equals the stride), '
    '`pointwise_pair` (two 1x1 convolutions in a row as one), '
    '`stride1_conv` (kernel gradients of the 2x2 phases as per-tap '
    'matmuls over batch chunks), `pointwise_conv` (1x1 convolutions as matmuls), '
    'attention on the per-head products Wq Wk^T and Wv Wo (`folds_heads`), '
    "`exact_gelu` (erf) and `dropout_keep_mask` (flax's masks as one fused hash); "
    '`canvas.render_relaxed` when beta = 0 (the final canvas alone); '
    "with vae.where_gradient = 'straight_through' (not the reference), "
    '`canvas.place_straight_through` (pad-and-slice '
    "forward, the einsum's gradient). Each other row swaps one of them for its alternative: "
    "`lax.conv_transpose` (what flax's nn.ConvTranspose runs), XLA's own convolutions "
    '(all of them, or the 1x1 ones only), the four head projections as written, '
    "`nn.gelu(approximate=False)` (erfc), jax.random.bernoulli's masks, the dense `canvas.place` "
    'einsum, a convolution per phase, the two 1x1 convolutions in turn, or (beta = 0) '
    'every canvas of the drawing rendered where only the last is used. Same values '
    'and gradients to float tolerance (tests/platform_kernels_test.py; the dropout masks '
    'bit-equal); the steps are timed in turn in one process.',
    '',
    *comparison_table(rows, MODEL, f's / step over "{MODEL}"'),
  ]


def dtype_lines(settings: Settings) -> list[str]:
  """Item 7: float32 against bfloat16 compute, on accelerators only."""
  header = ['### float32 against bfloat16 compute (stage-2 train step)', '']
  if not _on_accelerator():
    return [*header, 'Skipped: no GPU (bfloat16 compute is for GPUs and TPUs).']
  rows = []
  for name, get_config in CONFIGS.items():
    reference = get_config().vae.batch_size
    rows.append(
      vae_train.compare(
        name, get_config, reference, DTYPES, settings.variant_rounds, settings.variant_budget_s
      )
    )
  return [
    *header,
    '`config.model.compute_dtype`: activations and matmuls in that dtype; parameters, '
    'latents and losses float32. Timed in turn in one process.',
    '',
    *comparison_table(rows, 'float32', 's / step over float32'),
  ]


SECTIONS = {
  'stage2': stage2_lines,
  'prior': prior_lines,
  'sampling': sampling_lines,
  'parse': parse_lines,
  'kernels': kernels_lines,
  'variants': variants_lines,
  'dtype': dtype_lines,
}


def main(argv):
  del argv
  unknown = set(_ONLY.value) - set(ITEMS)
  if unknown:
    raise app.UsageError(f'Unknown --only entries {sorted(unknown)}; choose from {ITEMS}.')
  settings = QUICK if _QUICK.value else FULL
  start = time.perf_counter()
  lines = [f'Command: `{" ".join(["python -m benchmarks.run", *sys.argv[1:]])}`']
  for item in ITEMS:
    if item in _ONLY.value:
      logging.info('Benchmark %s.', item)
      item_start = time.perf_counter()
      lines += ['', *SECTIONS[item](settings), '', f'({time.perf_counter() - item_start:.0f} s)']
  lines += ['', f'Whole run: {time.perf_counter() - start:.0f} s.']
  title = 'Benchmark run' + (' (--quick)' if _QUICK.value else '')
  print(results.append_section(title, lines, _RESULTS.value))


if __name__ == '__main__':
  app.run(main)
