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


class WorkdirLockedError(UserError):
  """Another run holds the workdir."""
