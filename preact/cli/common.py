"""What every preact command shares: clean errors, quiet logs, multi-host start-up."""

from __future__ import annotations

import logging as py_logging
import os
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
  if jax.default_backend() == 'cpu' or os.environ.get('JAX_PLATFORMS', '') == 'cpu':
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


def run(main_fn):
  """app.run, but flag errors (unknown --config.key, bad values) exit 2 with one line."""
  tool = getattr(main_fn, 'tool', os.path.basename(sys.argv[0]))

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f'{tool}: error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)
    except UserError as e:
      print(f'{tool}: error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(main_fn, flags_parser=parse)
