"""Appends dated, machine-labelled sections to benchmarks/RESULTS.md."""

import datetime
import os
import platform

import jax
import jaxlib

RESULTS_FILE = os.path.join(os.path.dirname(__file__), 'RESULTS.md')


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what platform says."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_description() -> str:
  """One line: CPU, cores, JAX devices and versions."""
  device = jax.devices()[0]
  return (
    f'{cpu_model()}, {os.cpu_count()} cores; {jax.device_count()} x '
    f'{device.device_kind} ({device.platform}); jax {jax.__version__}, '
    f'jaxlib {jaxlib.__version__}, Python {platform.python_version()}'
  )


def append_section(title: str, lines: list[str], path: str = RESULTS_FILE) -> str:
  """Appends '## title (date)' with the machine and the given markdown lines."""
  stamp = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')
  text = '\n'.join([f'## {title} ({stamp})', '', f'Machine: {machine_description()}', '', *lines])
  with open(path, 'a') as f:
    f.write(text + '\n\n')
  return text
