"""NP-DRAW in JAX and Flax.

The public API of a finished run (npdraw_jax.api): load_run, Run, Drawing.
"""

import importlib

__version__ = '0.1.0'

_API_NAMES = ('load_run', 'Run', 'Drawing', 'Encoding', 'Frames', 'Edited')
__all__ = list(_API_NAMES)


def __getattr__(name: str):
  # Imported on first use: `import npdraw_jax.model.canvas` need not load the whole model.
  if name in _API_NAMES:
    return getattr(importlib.import_module('npdraw_jax.api'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
