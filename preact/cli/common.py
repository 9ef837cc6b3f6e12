"""What every preact command shares: clean errors, quiet logs, multi-host start-up."""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys

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
    raise UserError(f'cannot load --config: {one_line(e)}') from None
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


def run(main_fn):
  """app.run, but flag errors (unknown --config.key, bad values) exit 2 with one line."""
  tool = getattr(main_fn, 'tool', os.path.basename(sys.argv[0]))

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, UserError, AttributeError, KeyError, ValueError, TypeError,
            OSError) as e:
      text = one_line(e)
      if 'Traceback' in str(e):  # get_config() raised: its own message says what is wrong
        last = [l for l in str(e).strip().splitlines() if l.strip()][-1]
        text = 'cannot load --config: ' + re.sub(r'^\w+(Error|Exception): ', '', last.strip())
      elif isinstance(e, OSError):  # the --config file itself did not load
        text = f'cannot load --config: {text}'
      elif isinstance(e, (AttributeError, KeyError)):
        # ml_collections reports an unknown --config.key this way, naming the key.
        name = re.search(r"'([^']+)'", str(e).replace("\\'", "'"))
        bad = next((a.split('=')[0] for a in argv if a.startswith('--config.') and name
                    and a.split('=')[0].endswith('.' + name.group(1))), '--config.…')
        text = f'unknown config key in {bad}: {text}'
      print(f'{tool}: error: {text}', file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(main_fn, flags_parser=parse)
