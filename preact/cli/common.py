"""What every preact command shares: clean errors, quiet logs, multi-host start-up."""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys
import traceback

from absl import app, flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow only feeds TFDS here

from preact.errors import UserError, exit_on_user_error

_COORDINATOR = None


def define_distributed_flags():
  global _COORDINATOR
  if _COORDINATOR is not None:
    return
  _COORDINATOR = flags.DEFINE_string(
      'coordinator', None, 'host:port of process 0 for jax.distributed (default: let JAX '
      'detect the cluster: TPU pods, SLURM, …).')
  flags.DEFINE_integer('num_processes', None, 'Processes in the job (with --coordinator).')
  flags.DEFINE_integer('process_id', None, 'This process (with --coordinator).')


def init_distributed(from_config: bool):
  """jax.distributed.initialize when the launch asks for it (flag or config)."""
  import jax
  f = flags.FLAGS
  if not (from_config or (_COORDINATOR is not None and _COORDINATOR.value)):
    return
  # CPU processes talk over gloo (the option only concerns the CPU client, and asking
  # which backend we are on would start it before initialize may).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if _COORDINATOR.value:
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=f.num_processes,
                  process_id=f.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001
    raise UserError(f'jax.distributed.initialize failed ({e}); check --coordinator, '
                    '--num_processes and --process_id') from None


def main(tool: str):
  """Decorates an absl main: UserError → one line and exit 2; quiets JAX's noise."""
  def wrap(fn):
    inner = exit_on_user_error(tool)(fn)

    def run_main(argv):
      # JAX logs at INFO that it found no TPU, orbax every step of every save: no news.
      for name in ('jax._src.xla_bridge', 'absl'):
        py_logging.getLogger(name).setLevel(py_logging.WARNING)
      py_logging.getLogger('preact').setLevel(py_logging.INFO)
      return inner(argv)
    run_main.tool = tool
    return run_main
  return wrap


def no_arguments(argv):
  """The mains take flags only; a stray word is most likely a flag missing its --."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {" ".join(argv[1:])} (flags start with --)')


def one_line(e: BaseException) -> str:
  text = str(e).replace("\\'", "'").replace('\\n', ' ').replace('\n', ' ').strip(' "')
  text = re.sub(r"^'+([^']*)'+", r'\1', text).rstrip("'")  # KeyError's quoting
  return ' '.join(text.split()) or e.__class__.__name__


def load_config(holder):
  """The --config flag's value; a config file that fails to load is a UserError."""
  try:
    config = holder.value
    if config is not None:
      config.get('dataset')  # the file is loaded lazily; surface its errors here
  except Exception as e:  # noqa: BLE001 — anything a config file raises
    path = _config_path(sys.argv) or '--config'
    raise UserError(f'cannot load --config: {config_error(e, path)}') from None
  return config


def config_flag(help_text: str):
  from ml_collections import config_flags
  return config_flags.DEFINE_config_file('config', None, help_text, lock_config=True)


def default_config():
  """The embedded default experiment (experiments/fashion_mnist.py beside the package)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[2] / 'experiments' / 'fashion_mnist.py'
  if not path.exists():
    raise UserError(f'{path} is missing; pass --config=<experiment file>')
  spec = importlib.util.spec_from_file_location('preact_default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Exceptions that mean the config file's own code is wrong: report where.
_CODE_ERRORS = {'SyntaxError', 'NameError', 'ImportError', 'ModuleNotFoundError',
                'AttributeError', 'TypeError', 'KeyError', 'IndexError', 'ZeroDivisionError',
                'UnboundLocalError'}


def _config_path(argv) -> str | None:
  for a in argv:
    if a.startswith('--config='):
      return a.split('=', 1)[1].split(':', 1)[0]
  return None


def config_error(e: BaseException, path: str) -> str:
  """One line for a config file that failed to load: the file and line for a fault in
  its code, the message alone for a deliberate error (a bad row, a bad value)."""
  if isinstance(e, SyntaxError) and e.filename:
    return f'{e.filename}:{e.lineno}: SyntaxError: {e.msg}'
  text = str(e)
  if isinstance(e, FileNotFoundError) or 'No such file or directory' in text:
    return f'no such config file {path}'
  if 'get_config' in text and ('has no attribute' in text or 'AttributeError' in text):
    return f'{path} defines no get_config(); a config file returns its ConfigDict from it'
  target = os.path.abspath(path)
  if 'Traceback' in text:  # ml_collections passes get_config's exception on as text
    last = [l.strip() for l in text.strip().splitlines() if l.strip()][-1]
    kind, _, message = last.partition(': ')
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
  else:
    kind, message = e.__class__.__name__, one_line(e)
    frames = [(f.f_code.co_filename, line) for f, line in traceback.walk_tb(e.__traceback__)]
  where = [f'{f}:{line}' for f, line in frames if os.path.abspath(f) == target]
  raised_there = frames and os.path.abspath(frames[-1][0]) == target
  if where and (raised_there or kind.split('.')[-1] in _CODE_ERRORS):
    return f'{where[-1]}: {kind}: {message}'
  return message or kind  # raised on purpose deeper down (a bad row): its message says it


def run(main_fn):
  """app.run, but flag errors (a config file that does not load, an unknown
  --config.key, a bad value) exit 2 with one line."""
  tool = getattr(main_fn, 'tool', os.path.basename(sys.argv[0]))

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 — a config file may raise anything
      path = _config_path(argv)
      cause = e.__context__ if isinstance(e, flags.Error) and e.__context__ else e
      if path and _loading_config(e, cause):
        text = f'cannot load --config: {config_error(cause, path)}'
      elif isinstance(cause, (AttributeError, KeyError)):
        # ml_collections reports an unknown --config.key this way, naming the key.
        name = re.search(r"'([^']+)'", str(cause).replace("\\'", "'"))
        bad = next((a.split('=')[0] for a in argv if a.startswith('--config.') and name
                    and a.split('=')[0].endswith('.' + name.group(1))), '--config.…')
        text = f'unknown config key in {bad}: {one_line(cause)}'
      else:
        text = one_line(e)
      print(f'{tool}: error: {text}', file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(main_fn, flags_parser=parse)


def _loading_config(e: BaseException, cause: BaseException) -> bool:
  """Whether the error came from loading the --config file rather than a --config.key."""
  text = f'{e} {cause}'
  if isinstance(cause, (SyntaxError, ImportError, NameError, OSError)):
    return True
  if any(k in text for k in ('get_config', 'Failed loading config file', 'Traceback')):
    return True
  names = {f.f_code.co_name for f, _ in traceback.walk_tb(cause.__traceback__)}
  return '<module>' in names
