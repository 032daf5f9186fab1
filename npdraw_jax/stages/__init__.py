"""The pipeline's stages, in the order they run: bank, parse (bank_parse.py),
prior (train_prior.py), vae (train_vae.py) and eval (evaluate.py). Each is a
function (config, workdir) that skips itself when its artifact in workdir is
current for the configuration. scoring.py runs the bound over a split for
stage 2's held-out check, the eval stage and the baseline VAE; fid.py holds the
Frechet Inception Distance of the eval stage.
"""

from collections.abc import Callable

import ml_collections

from npdraw_jax import errors
from npdraw_jax.stages import bank_parse, evaluate, train_prior, train_vae

# Stage name -> function(config, workdir), in the order the stages run.
STAGES: dict[str, Callable] = {
  'bank': bank_parse.run_bank,
  'parse': bank_parse.run_parse,
  'prior': train_prior.train_and_evaluate,
  'vae': train_vae.train_and_evaluate,
  'eval': evaluate.run,
}
DEFAULT_STAGES = tuple(STAGES)


def check_stages(names: list[str]) -> list[str]:
  """Fails clearly on an unknown stage, before any work."""
  for name in names:
    if name not in STAGES:
      raise errors.ConfigError(f'Unknown stage {name!r} in --stages; stages: {",".join(STAGES)}.')
  if not names:
    raise errors.ConfigError('--stages is empty.')
  return names


# Stages whose checkpoint records a run checks (they take allow_changed_settings).
SETTINGS_CHECKED = ('prior', 'vae', 'eval')


def check_before_work(
  config: ml_collections.ConfigDict,
  workdir: str,
  stages: list[str],
  allow_changed_settings: bool = False,
) -> None:
  """Refuses, before any stage writes anything, a run whose stages would meet
  checkpoints recorded under other settings; reads only.

  When a requested stage would train, read or rebuild anything the prior and
  VAE checkpoints depend on, their records must match the configuration
  (checkpointing.check_settings): a K=12 rerun of a finished workdir stops
  here, not after the bank and parses are rebuilt.
  """
  rebuilds = any(
    name in ('bank', 'parse') and not bank_parse.is_current(config, workdir, name)
    for name in stages
  )
  if rebuilds or set(stages) & set(SETTINGS_CHECKED):
    train_prior.check_recorded_settings(config, workdir, allow_changed_settings)
    train_vae.check_recorded_settings(config, workdir, allow_changed_settings)
