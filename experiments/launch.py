"""Shared command line of the experiments: flags, stage checks, dispatch, errors.

  python -m experiments.<dataset> --workdir=DIR [--config=FILE]
      [--config.FIELD=VALUE ...] [--stages=bank,parse,...] [--verbose]
      [--allow_changed_settings]

The stages run in the order given; each skips itself when its artifact in DIR
is current for the configuration. Before any stage writes, prior or VAE
checkpoints recorded under other settings stop the run (changed training
settings go on with --allow_changed_settings, and are recorded). One run at a
time holds DIR (a lock on DIR/.lock, taken by process 0); a second one stops
at once. A user error (a bad flag or config field, unusable data, checkpoints
of other settings, a missing earlier stage, a full disk, a workdir held by
another run) ends the command with one line on stderr and exit status 2;
--verbose (or NPDRAW_VERBOSE=1) prints its traceback first. A Ctrl-C, SIGTERM
or SIGHUP stops the run after the training step or eval batch in progress (or
before the next stage), its work saved, with one line and the signal's exit
status (130, 143, 129); a second one ends it at once. Anything else is a bug
and ends with Python's traceback.
"""

import contextlib
import errno
import logging as python_logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from configs import ranges
from npdraw_jax import errors, stages
from npdraw_jax.infra import distributed, interrupt, training, workdir_lock

USER_ERROR_STATUS = 2  # The exit status of a user error, as for a command-line mistake.
PEER_LOST_STATUS = 1  # Another process of a distributed run died: not the user's mistake.
VERBOSE_ENV = 'NPDRAW_VERBOSE'  # Set to 1: user errors print their traceback too.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EROFS)


class QuietCheckpointer(python_logging.Filter):
  """Drops Orbax's per-save INFO lines; its warnings and errors still show."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname


def prepare(config, joined: str | None = None) -> None:
  """What every command does before its stages: log the process and the
  devices (the first line; `joined`: how it joined a multi-process run), quiet
  Orbax's per-save lines, keep TensorFlow off the accelerators."""
  logging.info(
    'JAX process %d of %d%s, %d local / %d global devices (%s).',
    jax.process_index(),
    jax.process_count(),
    f' (joined through {joined})' if joined else '',
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  logging.get_absl_handler().addFilter(QuietCheckpointer())
  if config.data.source == 'tfds':
    training.hide_accelerators_from_tensorflow()


# --- User errors as one line ----------------------------------------------------


def _chain(error: BaseException) -> list[BaseException]:
  """error, then the exceptions it was raised from or while handling, innermost last."""
  chain = []
  while error is not None and all(error is not e for e in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _one_line(text: str) -> str:
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


def _disk_full_message(error: BaseException) -> str | None:
  """The message for a full disk anywhere in error's chain, else None.

  Checkpoint writers may wrap the OSError in their own exception, keeping only
  its text, hence the text match beside the errno.
  """
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
      where = f' writing {e.filename}' if e.filename else ''
      reason = f'{e.strerror}{where}'
      break
    if os.strerror(errno.ENOSPC) in str(e):
      reason = os.strerror(errno.ENOSPC)
      break
  else:
    return None
  return (
    f'The disk is full ({reason}). Free space or use a --workdir on a disk with room, then '
    'rerun the same command: finished stages and the last checkpoint are kept.'
  )


def user_error_message(error: BaseException) -> str | None:
  """The one-line message of a user error, or None when error is a bug."""
  if isinstance(error, (errors.UserError, app.UsageError, flags.Error)):
    return _one_line(str(error))
  return _disk_full_message(error) or _read_only_message(error)


def _read_only_message(error: BaseException) -> str | None:
  """The message for a file the run may not write (a read-only run directory)."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _READ_ONLY_ERRNOS:
      where = f' {e.filename}' if e.filename else ''
      return (
        f'Cannot write{where}: {e.strerror}. Run the stages that write in a directory you '
        'can write (a finished run can be evaluated read-only with --stages=eval).'
      )
  return None


def _command_line_error_message(error: BaseException) -> str | None:
  """The one-line message of a failure to parse the flags or load the config file.

  config_flags looks each --config.FIELD override up in the config file's
  config: an unknown field is a KeyError (an AttributeError around it); a
  config file that fails to load is an OSError or a ValueError.
  """
  chain = _chain(error)
  unknown = [e for e in chain if isinstance(e, KeyError)]
  if unknown:
    field = str(unknown[-1].args[0])  # The innermost holds the bare name.
    # Every flag --config.A.B... naming that field; sys.argv: the flags never parsed.
    named = [
      a.split('=')[0]
      for a in sys.argv[1:]
      if a.lstrip('-').startswith('config.') and field in a.split('=')[0].split('.')[1:]
    ]
    hints = [
      line for e in unknown for line in str(e.args[0]).splitlines() if 'Did you mean' in line
    ]
    return ' '.join(
      [
        f'Unknown config field {field!r}' + (f' in {", ".join(named)}.' if named else '.'),
        *hints[:1],
        'Every field is listed, with a comment, in configs/default.py.',
      ]
    )
  if isinstance(error, (flags.Error, OSError, ValueError)):
    text = str(error)
    if 'Traceback (most recent call last)' in text:
      # A config file's get_config failed: its own message is the last in the chain.
      return f'{_one_line(text.splitlines()[0])} {_one_line(str(chain[-1]))}'
    return _one_line(text)
  return user_error_message(error)


def _verbose() -> bool:
  """Whether user errors show their traceback: --verbose or NPDRAW_VERBOSE=1."""
  if os.environ.get(VERBOSE_ENV, '0') not in ('', '0'):
    return True
  if flags.FLAGS.is_parsed() and 'verbose' in flags.FLAGS:
    return flags.FLAGS.verbose
  return '--verbose' in sys.argv[1:]  # The flags failed to parse.


@contextlib.contextmanager
def _user_errors_end_the_command(
  message_of: Callable[[BaseException], str | None],
) -> Iterator[None]:
  """A user error (message_of gives its message) becomes one line on stderr and
  exit status 2; any other exception propagates unchanged."""
  try:
    yield
  except Exception as error:
    message = message_of(error)
    if message is None:
      raise
    if _verbose():
      traceback.print_exc()
    sys.stderr.write(f'Error: {message}\n')
    sys.exit(USER_ERROR_STATUS)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the config file loaded now: a failure to load
  it would otherwise only surface at the config's first use."""
  with _user_errors_end_the_command(_command_line_error_message):
    argv = flags.FLAGS(argv)
    config = flags.FLAGS.config if 'config' in flags.FLAGS else None
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      flags.FLAGS.config.to_dict()  # config_flags' stand-in raises the load failure on use.
  return argv


def define_distributed_flags() -> None:
  """The flags that join a multi-process run explicitly (npdraw_jax.infra.distributed)."""
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0, the same on every process of a multi-process run '
    '(not needed on Cloud TPU, SLURM or Open MPI, which are detected).',
  )
  flags.DEFINE_integer('num_processes', None, 'Processes in the multi-process run.')
  flags.DEFINE_integer('process_id', None, 'This process, in [0, --num_processes).')


def join_distributed_run() -> str | None:
  """Joins the multi-process run the flags or the cluster describe, if any,
  before anything asks JAX for its devices; returns how (None: it is alone)."""
  return distributed.initialize(
    flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id
  )


def hold_workdir(workdir: str) -> contextlib.AbstractContextManager:
  """The workdir's lock for a with block around a run's work; only process 0
  of a run takes it, so the processes of one distributed run do not refuse
  each other."""
  if jax.process_index() == 0:
    return workdir_lock.held(workdir)
  return contextlib.nullcontext()


def run_app(main: Callable[[list[str]], None], define_flags: Callable[[], None] = lambda: None):
  """app.run(main) for every command of the project: define_flags() defines the
  flags beyond --verbose; a user error in it, in parsing or in main is one line
  on stderr and exit status 2.

  DEFINE_config_file parses the default config file and the --config.FIELD
  overrides at once, hence define_flags runs under the same reporting.
  """
  flags.DEFINE_bool(
    'verbose', False, f'Print the traceback of a user error too (or set {VERBOSE_ENV}=1).'
  )
  with _user_errors_end_the_command(_command_line_error_message):
    define_flags()
  _list_project_flags_in_help()

  def reporting_main(argv):
    try:
      with _user_errors_end_the_command(user_error_message):
        main(argv)
    except errors.Interrupted as stop:  # What was finished is saved: one line suffices.
      sys.stderr.write(f'{interrupt.received().name}: {stop}\n')
      sys.exit(interrupt.exit_status())
    except Exception as error:
      if not distributed.is_peer_loss(error):
        raise
      _end_after_peer_loss(error)

  app.run(reporting_main, flags_parser=_parse_flags)


def _list_project_flags_in_help() -> None:
  """--help lists the project's flags: absl shows the main module's key flags
  only, and ours are defined here, in experiments/launch.py."""
  main_module = sys.argv[0]
  for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith('experiments.'):
      for flag in module_flags:
        flags.FLAGS.register_key_flag_for_module(main_module, flag)


def _end_after_peer_loss(error: BaseException) -> None:
  """One line, then exit at once: a normal exit would wait at JAX's shutdown
  barrier for the dead process and abort there."""
  if _verbose():
    traceback.print_exc()
  sys.stderr.write(
    f'Error: another process of this {jax.process_count()}-process run stopped '
    f'({_one_line(str(error))[:200]}). Rerun the same command on every host to resume '
    'from the last checkpoint.\n'
  )
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(PEER_LOST_STATUS)


# --- The pipeline command ---------------------------------------------------------


def run(config_name: str) -> None:
  """Defines the flags with configs/<config_name>.py as default and runs."""

  def define_flags():
    default_config = os.path.join(os.path.dirname(configs.__file__), f'{config_name}.py')
    config_flags.DEFINE_config_file(
      'config', default_config, 'Configuration file.', lock_config=True
    )
    flags.DEFINE_string('workdir', None, 'Directory for artifacts and checkpoints.')
    flags.DEFINE_list('stages', list(stages.DEFAULT_STAGES), 'Stages to run, in order.')
    flags.DEFINE_bool(
      'allow_changed_settings',
      False,
      'Continue the prior and VAE checkpoints under training settings other than those '
      'they recorded (the change is recorded); shapes and data must still match.',
    )
    flags.mark_flag_as_required('workdir')
    define_distributed_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    names = stages.check_stages(flags.FLAGS.stages)
    config = flags.FLAGS.config
    ranges.check(config)
    workdir = os.path.abspath(flags.FLAGS.workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise errors.ConfigError(f'--workdir {workdir} exists and is not a directory: name another.')
    prepare(config, joined=join_distributed_run())
    allow_changed_settings = flags.FLAGS.allow_changed_settings
    os.makedirs(workdir, exist_ok=True)
    with hold_workdir(workdir), interrupt.handled():
      stages.check_before_work(config, workdir, names, allow_changed_settings)
      # Every process decides a stage's work from the files of the stages before it.
      distributed.barrier('checked')
      for name in names:
        interrupt.stop_if_requested(f'interrupted before stage {name}')
        logging.info('=== Stage %s ===', name)
        options = {'allow_changed_settings': allow_changed_settings}
        stages.STAGES[name](config, workdir, **(options if name in stages.SETTINGS_CHECKED else {}))
        distributed.barrier(f'stage {name} written')
    logging.info('Done: %s in %s.', ','.join(names), workdir)

  run_app(main, define_flags)
