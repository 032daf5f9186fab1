"""The project's user errors: problems the user can fix, told in one line.

The launcher (experiments/launch.py) prints the message of a UserError as one
line and exits with status 2; any other exception is a bug and keeps its
traceback. Each message says what is wrong and what to do. Errors of one
module stay there (input_pipeline.DataError, checkpointing.
IncompatibleCheckpointError) and derive from UserError.
"""


class UserError(Exception):
  """A problem with the command, its configuration, data or workdir; not a bug."""


class ConfigError(UserError, ValueError):
  """A configuration field or command-line flag that cannot work."""


class MissingArtifactError(UserError, FileNotFoundError):
  """A stage's input, written by an earlier stage, is absent or was made under
  other settings; the message names the stage to run."""


class RecordError(UserError, ValueError):
  """A record file of the run directory (settings.json, config.json, eval.json,
  the lock record) that does not parse; the message names the file."""


class WorkdirLockedError(UserError):
  """Another run holds the workdir."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a NaN or infinity; the message names the step, what was
  non-finite and the checkpoint that is kept."""


class Interrupted(Exception):
  """The run stopped at a Ctrl-C, SIGTERM or SIGHUP (npdraw_jax/infra/interrupt.py)
  with its finished work saved. Not a UserError: the launcher prints the
  message and exits with the status of a command ended by that signal.

  Args:
    where: where it stopped, e.g. 'Stage prior: interrupted at step 57'.
    step: the training step saved last, when it stopped in a training loop.
  """

  def __init__(self, where: str, step: int | None = None):
    super().__init__(f'{where}; rerun the same command to resume')
    self.step = step
