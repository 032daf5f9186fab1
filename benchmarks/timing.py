"""Wall-clock timing of jitted calls, shared by the benchmarks."""

import statistics
import time
from collections.abc import Callable

import jax


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
