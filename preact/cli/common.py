"""What every preact command shares: clean errors, quiet logs, multi-host start-up."""

from __future__ import annotations

import glob
import logging as py_logging
import os
import re
import sys
import traceback

from absl import app, flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow only feeds TFDS here

from preact.errors import UserError, one_line

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
  """Decorates an absl main: the one place a UserError from the library becomes one
  line on stderr and exit status 2; quiets JAX's noise."""
  def wrap(fn):
    def run_main(argv):
      # JAX logs at INFO that it found no TPU, orbax every step of every save: no news.
      for name in ('jax._src.xla_bridge', 'absl'):
        py_logging.getLogger(name).setLevel(py_logging.WARNING)
      py_logging.getLogger('preact').setLevel(py_logging.INFO)
      try:
        return fn(argv)
      except UserError as e:
        print(f'{tool}: error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    run_main.tool, run_main.module = tool, fn.__module__
    return run_main
  return wrap


def no_arguments(argv):
  """The mains take flags only; a stray word is most likely a flag missing its --."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {" ".join(argv[1:])} (flags start with --)')


_CONFIG_FLAG = None  # this tool's --config: (help text, default config maker or None)


class _Config:
  """What a tool's ``--config`` holds once flags are parsed: the ConfigDict of its file
  (or of the tool's default) with every ``--config.a.b=v`` applied, else None."""

  @property
  def value(self):
    value = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if value is None and _CONFIG_FLAG and _CONFIG_FLAG[1]:
      return _CONFIG_FLAG[1]()  # no --config: the tool's default
    return value


def config_flag(help_text: str, default=None):
  """Declares this tool's ``--config=FILE[:ARG]``; :func:`run` defines the flag when it
  parses, so that the file runs once, its faults are one line, and overrides apply."""
  global _CONFIG_FLAG
  _CONFIG_FLAG = (help_text, default)
  return _Config()


def default_config():
  """The embedded default experiment (experiments/fashion_mnist.py)."""
  return preload_config('fashion_mnist')


def packaged_experiments() -> dict[str, str]:
  """{name: file} of the experiment configs installed as preact.experiments."""
  import importlib.util
  import pathlib
  found = importlib.util.find_spec('preact.experiments')
  if found is None:
    return {}
  return {p.stem: str(p) for folder in found.submodule_search_locations or ()
          for p in sorted(pathlib.Path(folder).glob('*.py')) if p.stem != '__init__'}


def config_path(name: str) -> str:
  """A --config file: a path, or the name of a packaged experiment (``table2``)."""
  if os.path.isfile(name):
    return os.path.abspath(name)
  packaged = packaged_experiments()
  stem = os.path.basename(name).removesuffix('.py')
  if os.sep not in name and stem in packaged:
    return packaged[stem]
  raise UserError(f'cannot load --config: no such config file {os.path.abspath(name)} '
                  f'(the packaged experiments are {", ".join(packaged) or "missing"})')


# Exceptions that mean the config file's own code is wrong: report where.
_CODE_ERRORS = (SyntaxError, NameError, ImportError, AttributeError, TypeError, KeyError,
                IndexError, ZeroDivisionError)


def _config_spec(argv) -> str | None:
  """The --config flag's value; as for any absl flag, the last one given counts."""
  spec = None
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      spec = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _fault(e: BaseException, path: str) -> str:
  """One line for an exception out of a config file: its file and line for a fault in
  the file's own code, the message alone for a deliberate error (a bad row, a value)."""
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
    return f'{e.filename}:{e.lineno}: SyntaxError: {e.msg}'
  frames = [(f.f_code.co_filename, line) for f, line in traceback.walk_tb(e.__traceback__)]
  here = [line for f, line in frames if os.path.abspath(f) == path]
  if here and (os.path.abspath(frames[-1][0]) == path or isinstance(e, _CODE_ERRORS)):
    return f'{path}:{here[-1]}: {e.__class__.__name__}: {one_line(e)}'
  return one_line(e)


def preload_config(spec: str):
  """Loads ``--config=FILE[:ARG]`` (FILE: a path or a packaged experiment's name), so
  that a file that fails gets one line naming the file, the line and the error."""
  import importlib.util
  path, _, arg = spec.partition(':')
  path = config_path(path)
  try:
    loader = importlib.util.spec_from_file_location('preact_config_check', path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 — a config file may raise anything
    raise UserError(f'cannot load --config: {_fault(e, path)}') from None
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(f'cannot load --config: {path} defines no get_config(); a config file '
                    'returns its ConfigDict from it')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001
    raise UserError(f'cannot load --config: {_fault(e, path)}') from None
  if 'experiment' in config and not config.experiment:  # what titles the run's report
    with config.unlocked():
      config.experiment = os.path.basename(path).removesuffix('.py')
  return config


def check_overrides(config, argv):
  """Every --config.a.b=… names a key of the config."""
  import difflib
  from preact import config as config_lib
  known = config_lib.flatten(config)
  for a in argv:
    m = re.match(r'^--(?:no)?config\.([^=]+)', a)
    if m and m.group(1) not in known and not any(k.startswith(m.group(1) + '.')
                                                 for k in known):
      close = difflib.get_close_matches(m.group(1), known, n=1)
      hint = f' (did you mean --config.{close[0]}?)' if close else ''
      raise UserError(f'unknown config key in --config.{m.group(1)}{hint}')


def define_config(argv, help_text: str, default=None, flag_values=flags.FLAGS):
  """Defines ``--config`` in flag_values as the ConfigDict of argv's ``--config=FILE[:ARG]``
  (loaded here, once) or of ``default()``, after checking argv's overrides against it.
  Returns argv without ``--config=FILE``, for the overrides to apply when it is parsed."""
  from ml_collections import config_flags
  spec = _config_spec(argv)
  overrides = any(re.match(r'^--(?:no)?config\.', a) for a in argv)
  config = preload_config(spec) if spec else default() if default and overrides else None
  if config is None:  # the tool's default, if any, loads when asked for (_Config.value)
    if overrides:
      raise UserError('--config.<key>=… overrides a config file: pass --config=FILE too')
    flags.DEFINE_string('config', None, help_text, flag_values=flag_values)
    return argv
  check_overrides(config, argv)
  rest, skip = [], False
  for i, a in enumerate(argv):
    if skip:
      skip = False
    elif a == '--config' and i + 1 < len(argv):
      skip = True
    elif not a.startswith('--config='):
      rest.append(a)
  # sys_argv: the flag finds its overrides there (by default it reads sys.argv).
  config_flags.DEFINE_config_dict('config', config, help_text, flag_values=flag_values,
                                  lock_config=True, sys_argv=rest)
  return rest


def _key_flags_for_help(module: str, program: str):
  """--help lists the key flags of the module named by argv[0]; for a console script
  (.venv/bin/preact-train) that is the script, not the module that defines its flags."""
  fv = flags.FLAGS
  for name in (module, __name__):
    for flag in fv.get_key_flags_for_module(name):
      fv.register_key_flag_for_module(program, flag)


def _glibc() -> tuple[int, int] | None:
  """glibc's (major, minor) version on Linux, else None."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    return tuple(map(int, version.split('.')[:2])) if libc == 'glibc' else None
  except (AttributeError, OSError, ValueError):
    return None


def huge_pages_offered() -> bool:
  """Whether glibc's malloc can be told to use transparent huge pages here: Linux, glibc
  ≥ 2.35 (where the tunable is new), and huge pages not turned off in the kernel."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      thp = f.read()
  except OSError:
    return False
  return (_glibc() or (0, 0)) >= (2, 35) and '[never]' not in thp


def cpu_only() -> bool:
  """Whether JAX will compute on the CPU here: JAX_PLATFORMS says cpu, or it says
  nothing and the machine has no NVIDIA GPU or TPU device node."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(glob.glob(p) for p in ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*',
                                         '/dev/vfio/[0-9]*'))


# XLA:CPU allocates a step's temporaries as one buffer at every step (ResNet-164
# unrolled: 3.25 GB) from a worker thread's malloc arena, which can only mmap a block that
# large, whatever mmap_max says, and unmaps it when freed; the kernel then zero-fills it
# again at the next step. With one arena, no mmap and no trimming, the freed block stays
# in the heap for the next step.
_CPU_TUNABLES = ('glibc.malloc.arena_max=1', 'glibc.malloc.mmap_max=0',
                 f'glibc.malloc.trim_threshold={64 << 30}')


def malloc_tunables() -> list[str]:
  """The glibc malloc tunables a command runs with here: transparent huge pages where
  offered, and on a CPU-only machine freed memory kept for reuse (_CPU_TUNABLES)."""
  if _glibc() is None:
    return []
  return (['glibc.malloc.hugetlb=1'] if huge_pages_offered() else []) + (
      list(_CPU_TUNABLES) if cpu_only() else [])


def tune_malloc():
  """Restarts this process (same pid, same arguments) with :func:`malloc_tunables`.

  XLA:CPU allocates a step's buffers afresh at every step. On 4 KiB pages the kernel
  faults in and zero-fills each one 4 KiB at a time, and huge pages alone took
  ``preact-bench`` ResNet-164 from 2977 to 2411 ms a step without remat (2709 → 2544 ms
  with it). Kept for reuse, the unrolled ResNet-164 takes no page fault a step instead
  of about 1,900. glibc reads its tunables only at start-up, hence the restart, before
  anything is imported. Child processes (PyTorch's reference in ``preact-bench``)
  inherit them. A process whose GLIBC_TUNABLES already names a malloc tunable is left
  as it is, and so is any with ``PREACT_TUNE_MALLOC=0``.
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  wanted = malloc_tunables()
  if ('glibc.malloc.' in tunables or os.environ.get('PREACT_TUNE_MALLOC', '1') == '0'
      or not wanted):
    return
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, *wanted]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def run(main_fn):
  """app.run, but a bad flag (a config file that does not load, an unknown --config.key,
  a bad value) exits 2 with one line."""
  tune_malloc()
  tool = getattr(main_fn, 'tool', os.path.basename(sys.argv[0]))
  module = getattr(main_fn, 'module', main_fn.__module__)
  main = sys.modules['__main__']
  if not main.__doc__ and module in sys.modules:  # a console script: --help shows the tool's
    main.__doc__ = sys.modules[module].__doc__

  def parse(argv):
    try:
      if _CONFIG_FLAG is not None:
        argv = define_config(argv, *_CONFIG_FLAG)
      _key_flags_for_help(module, argv[0])
      if any(a in ('--help', '-h', '--helpshort', '-?') for a in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's exits 1
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001
      print(f'{tool}: error: {one_line(e)}', file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(main_fn, flags_parser=parse)
