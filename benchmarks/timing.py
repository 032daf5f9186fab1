"""Wall-clock timing of jitted calls, shared by the benchmarks."""

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def time_call(fn: Callable, *args, repeats: int, warmup: int = 1) -> dict:
  """Times fn(*args), blocking on its result each call.

  Args:
    fn: the function to time (typically jitted).
    *args: its arguments, the same for every call.
    repeats: timed calls after the warm-up ones.
    warmup: untimed calls first; the first one (compile + run) is reported as compile_s.

  Returns:
    {'compile_s': first call's seconds (None without warm-up), 'median_s': median of
    the timed calls (None without any), 'all_s': their seconds, 'output': the last result}.
  """

  def timed():
    start = time.perf_counter()
    output = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, output

  compile_s, output = None, None
  for i in range(warmup):
    seconds, output = timed()
    if i == 0:
      compile_s = seconds
  all_s = []
  for _ in range(repeats):
    seconds, output = timed()
    all_s.append(seconds)
  return {
    'compile_s': compile_s,
    'median_s': statistics.median(all_s) if all_s else None,
    'all_s': all_s,
    'output': output,
  }


def alternate(fns: dict[str, Callable], rounds: int, budget_s: float | None = None) -> dict:
  """Times already-compiled calls in turn, round after round, so noise hits all alike.

  Args:
    fns: name -> a no-argument function returning arrays (blocked on).
    rounds: timed calls of each function at most.
    budget_s: a function stops once its timed calls so far plus its slowest one
      would pass this many seconds (it always gets one); None: no limit.

  Returns:
    name -> list of seconds, one per timed call.
  """
  seconds = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      spent = seconds[name]
      if budget_s is not None and spent and sum(spent) + max(spent) > budget_s:
        continue
      start = time.perf_counter()
      jax.block_until_ready(fn())
      spent.append(time.perf_counter() - start)
  return seconds


def matmul_flops_per_s(size: int, repeats: int = 5) -> float:
  """Achieved FLOP/s of a [size, size] @ [size, size] float32 product: the device's peak here."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  product = jax.jit(jnp.dot)
  best = min(time_call(product, a, b, repeats=repeats)['all_s'])
  return 2 * size**3 / best


def rate(count: float, seconds: float) -> str:
  """count / seconds, formatted to three significant digits (with thousands separators)."""
  value = count / seconds
  return f'{value:,.0f}' if value >= 100 else f'{value:.3g}'
