"""Test-session setup and shared fixtures.

8 fake CPU devices for the parallelism tests: XLA reads its flags when its backend
starts, so they are set before anything imports jax.
"""
import fcntl
import os
import pathlib
import subprocess
import sys

# The suite's tiny nets run a few steps each, so compiling dominates: LLVM's cheapest
# optimization level compiles 25-30% faster, and XLA:CPU's older loop emitters instead
# of its MLIR fusion emitters another ~20% (the programs run slower).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {FAST_COMPILE}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests (and the subprocesses of the CLI tests) compile the same tiny programs;
# XLA's persistent cache lets each compile once per test session. All of them: a CLI
# run's small programs (init, eval, probe) each take well under a second to compile,
# and caching them too saves about 2 s of a repeated 10 s run.
import tempfile  # noqa: E402
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'preact-test-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def fmnist_dir():
  """A TFDS data_dir holding the real Fashion-MNIST, prepared once from Debian's files
  (shared by xdist workers through a lock)."""
  from preact import data
  if not os.path.exists(os.path.join(data.DEBIAN_FASHION_MNIST, 'train-images-idx3-ubyte.gz')):
    pytest.skip('dataset-fashion-mnist is not installed (launch/setup.sh installs it)')
  root = pathlib.Path(os.environ.get('PREACT_TEST_DATA_DIR',
                                     pathlib.Path.home() / 'tensorflow_datasets'))
  root.mkdir(parents=True, exist_ok=True)
  with open(root / '.preact-test.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    data.builder('fashion_mnist', str(root))
  return str(root)


def cli_env(devices: int = 1, fast_compile: bool = True) -> dict:
  """The environment of a command a test starts; ``fast_compile=False`` for commands
  that run more than they compile (benchmarks, full evaluations)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices} '
                      f'{FAST_COMPILE if fast_compile else ""}')
  env['PYTHONPATH'] = str(REPO)
  return env


def run_cli(tool: str, *args, devices: int = 1, check=False, timeout=600,
            fast_compile: bool = True, **kw):
  """Runs a preact console tool as a subprocess, the way a user does."""
  cmd = [sys.executable, '-m', f'preact.cli.{tool}', *map(str, args)]
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        env=cli_env(devices, fast_compile), timeout=timeout, cwd=REPO, **kw)
  if check and proc.returncode:
    raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return proc


@pytest.fixture(autouse=True)
def _fresh_data_cache():
  """Splits are cached per process; tests mock TFDS with different sizes."""
  from preact import data
  data.load_arrays.cache_clear()
  data.channel_stats.cache_clear()
  yield
  data.load_arrays.cache_clear()
  data.channel_stats.cache_clear()


# --------------------------------------------------------------------------------------
# Helpers the test files share.

def tiny_config(**overrides):
  """A ResNet-8 run of 3 steps on CIFAR-10 (tests mock it), with ``overrides``."""
  from preact import config as config_lib
  c = config_lib.base()
  c.dataset = 'cifar10'
  c.model.depth, c.model.block = 8, 'basic'
  c.batch_size, c.eval_batch_size = 16, 16
  c.total_steps = 3
  c.checkpoint_every = c.eval_every = c.log_every = 1000
  c.optimizer.schedule, c.optimizer.warmup_steps = 'cosine', 0
  c.progress = 'log'
  c.probe_every = 0  # on where a test is about it
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def init(module, key, x, *args, **kwargs):
  """``module.init`` compiled (``x`` traced, the rest static): eagerly, a ResNet-20's
  init dispatches op by op and takes seconds."""
  import jax
  return jax.jit(lambda k, x: module.init(k, x, *args, **kwargs))(key, x)


def params_of(workdir):
  """The saved state of a run's latest checkpoint, as numpy arrays."""
  from preact import checkpoint
  ck = checkpoint.Checkpoints(workdir)
  try:
    return ck.restore_arrays()
  finally:
    ck.close()


def tree_close(a, b, rtol=1e-4, atol=1e-6):
  """Two pytrees of the same structure, leaf by leaf within tolerance."""
  import jax
  import numpy as np
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, w, rtol=rtol, atol=atol)
