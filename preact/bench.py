"""Benchmarks: the real train step on synthetic data, beside a PyTorch reference.

Everything here runs without TensorFlow. Figures worth quoting are ratios measured in
one run (ours / PyTorch, ResNet-1001 / ResNet-164): absolute times on shared machines
are noise.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from preact import config as config_lib, models, parallel, step as step_lib


def cifar_model(depth=164, block='bottleneck', unit='full_preact', dtype='float32',
                scan='auto', remat='auto', cpu_kernels='auto', num_classes=10) -> models.ResNet:
  """The CIFAR net a benchmark times, with the config's 'auto' rules for this backend."""
  return models.cifar_resnet(depth, unit, block, num_classes, dtype=jnp.dtype(dtype),
                             **models.hardware(depth, remat, cpu_kernels, scan))


def _train_step(model, channels: int):
  """The paper's optimizer (base config, 64k-step schedule) and the real per-replica
  train step, with a fixed input normalization."""
  tx = step_lib.make_optimizer(config_lib.base().optimizer, 64_000)
  return tx, step_lib.make_train_step(model, tx, [120.0] * channels, [64.0] * channels, seed=0)


def _median_time(fn, steps):
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_peak(dtype='float32', n=2048, reps=5) -> float:
  """FLOP/s of a large square matmul on the first device: the peak MFU is relative to."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  return 2 * n ** 3 / _median_time(lambda: f(a), reps)


def _memory(compiled) -> float | None:
  """Bytes XLA plans for one call: arguments, outputs and temporaries, less aliasing."""
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 — not every backend reports it
    return None


def _compiled_step(model, batch, image_shape, parallelism='none'):
  """The real train step compiled ahead of time; a function that runs it once on a
  batch of random uint8 images (returning its metrics); the replicas; compile time."""
  tx, step = _train_step(model, image_shape[-1])
  rng = np.random.default_rng(0)
  host = {'image': rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8),
          'label': rng.integers(0, 10, (batch,), dtype=np.int32)}
  if parallelism == 'none':  # one device, no collectives: the step alone
    replicas = parallel.Replicas('shard_map', jax.devices()[:1])
  else:
    replicas = parallel.Replicas(parallelism)
  state = step_lib.init_state(model, tx, 0, image_shape, replicas.replicated)
  data = replicas.put_batch(host)
  t = time.perf_counter()
  compiled = replicas.map(step).lower(state, data).compile()
  compile_s = time.perf_counter() - t
  holder = [state]

  def one():
    holder[0], metrics = compiled(holder[0], data)
    return metrics

  return compiled, one, replicas, compile_s


def bench_train(model, batch=128, image_shape=(32, 32, 3), steps=10, warmup=2,
                parallelism='none', peak_flops=None) -> dict:
  """Compile time, step time, images/s, memory and MFU of the full train step (forward,
  backward, SGD with momentum and weight decay) on random uint8 images. ``steps=0``
  compiles only: XLA's memory plan of a step too big to run here."""
  compiled, one, replicas, compile_s = _compiled_step(model, batch, image_shape, parallelism)
  for _ in range(warmup if steps else 0):
    jax.block_until_ready(one())
  step_s = _median_time(one, steps) if steps else float('nan')
  params, fwd_flops = models.size_and_flops(model, image_shape)
  train_flops = 3 * fwd_flops * batch  # forward + backward (≈ 2× forward)
  out = dict(depth=None, params=params, batch=batch, dtype=str(jnp.dtype(model.dtype)),
             scan=model.scan, remat=model.remat, cpu_kernels=model.cpu_kernels,
             parallelism=parallelism,
             devices=replicas.count, compile_s=compile_s, step_ms=1e3 * step_s,
             images_per_s=batch / step_s, flops_per_image=fwd_flops,
             achieved_tflops=train_flops / step_s / 1e12,
             peak_mem_gb=(_memory(compiled) or float('nan')) / 2**30,
             rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
             backend=jax.default_backend(), device=str(jax.devices()[0].device_kind))
  if peak_flops:
    out['matmul_peak_tflops'] = peak_flops / 1e12
    out['mfu'] = train_flops / step_s / peak_flops
  return out


def op_profile(model, batch=128, image_shape=(32, 32, 3), steps=2, attempts=3) -> dict:
  """Per-kind and per-op time of one train step (preact.profile), after a warm-up step,
  beside the step's own median time."""
  from preact import profile
  compiled, one, _, _ = _compiled_step(model, batch, image_shape)
  jax.block_until_ready(one())
  step_ms = 1e3 * _median_time(one, 3)
  return dict(step_ms=step_ms, **profile.profile_step(compiled.as_text(), one, steps,
                                                      attempts=attempts))


def bench_probe(model, batch=32, image_shape=(32, 32, 3), steps=3) -> float:
  """Milliseconds of one in-training probe (:class:`preact.probes.TrainingProbe`'s work:
  the exact ∂L/∂x_l and ‖x_l‖ of every unit on a batch, host side included)."""
  from preact import probes
  x = jnp.asarray(np.random.default_rng(2).normal(size=(batch, *image_shape)), jnp.float32)
  labels = np.arange(batch) % 10
  variables = jax.jit(functools.partial(model.init, train=False))(models.init_key(0), x)
  probe = lambda: probes.gradient_probe(model, variables, x, labels, train=True)
  probe()
  return 1e3 * _median_time(probe, steps)


def bench_eval(model, batch=500, image_shape=(32, 32, 3), steps=5) -> float:
  """Images/s of the evaluation forward pass."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      models.init_key(0), jnp.zeros((1, *image_shape)))
  variables = models.model_state(variables)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, *image_shape)), jnp.float32)
  f = jax.jit(functools.partial(model.apply, train=False))
  jax.block_until_ready(f(variables, x))
  return batch / _median_time(lambda: f(variables, x), steps)


def compile_times(depths=(164, 1001), block='bottleneck', batch=128, dtype='float32',
                  scan='on', remat='auto') -> dict:
  """The train step's compile time at each depth (ahead-of-time lower + compile)."""
  out = {}
  for depth in depths:
    model = cifar_model(depth, block, dtype=dtype, scan=scan, remat=remat)
    tx, step = _train_step(model, 3)
    replicas = parallel.Replicas('shard_map', jax.devices()[:1])
    state = jax.eval_shape(lambda m=model: step_lib.init_state(m, tx, 0, (32, 32, 3)))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                        sharding=replicas.replicated), state)
    data = {'image': jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8,
                                          sharding=replicas.sharded),
            'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicas.sharded)}
    t = time.perf_counter()
    replicas.map(step).lower(state, data).compile()
    out[depth] = time.perf_counter() - t
  return out


def pipeline_images_per_s(images: np.ndarray, labels: np.ndarray, batch=128, padding=4,
                          steps=50) -> float:
  """Host images/s of the in-memory pipeline (sampling, crop, flip) on these arrays."""
  from preact import data
  d = data.InMemory('bench', batch, seed=0, padding=padding, images=images, labels=labels)
  d.batch(0)
  t = time.perf_counter()
  for s in range(1, steps + 1):
    d.batch(s)
  return batch * steps / (time.perf_counter() - t)


def torch_reference(depth=164, block='bottleneck', unit='full_preact', batch=128,
                    image_shape=(32, 32, 3), steps=10, warmup=2, expect_params=None,
                    dtype='float32', timeout=1800, profile=False) -> dict | None:
  """The PyTorch reference, run as a child process (None when torch is absent)."""
  try:
    import importlib.util
    if importlib.util.find_spec('torch') is None:
      return None
  except ImportError:
    return None
  cmd = [sys.executable, '-m', 'preact.bench_torch', f'--depth={depth}', f'--unit={unit}',
         f'--block={block}', f'--batch={batch}', f'--image_shape={",".join(map(str, image_shape))}',
         f'--steps={steps}', f'--warmup={warmup}', f'--dtype={dtype}']
  if expect_params is not None:
    cmd.append(f'--expect_params={expect_params}')
  if profile:
    cmd.append('--profile')
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  if proc.returncode:
    raise RuntimeError(f'PyTorch reference failed:\n{proc.stderr[-2000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def conv_profile(depth=164, block='bottleneck', batch=128, reps=5, torch_too=True,
                 dtype='float32') -> list[dict]:
  """Where the train step's time goes, per convolution shape: forward and forward +
  both gradients for every distinct conv of the CIFAR net, XLA as autodiff emits it,
  with preact's XLA:CPU formulation, oneDNN's (where built) and PyTorch (float32 only);
  times the number of such convs. For the shape of a unit's last conv, also oneDNN's
  forward with the shortcut added in the same pass (``onednn_add_fused_fwd_ms``, the
  fused kernel in either dtype, which is how ``onednn.conv_add`` chooses) and after it
  (``onednn_add_in_turn_fwd_ms``), and how many last convs have it (``last_count``)."""
  from preact import cpu_kernels, layers, onednn
  from preact.units import BLOCKS
  n, widths = models.cifar_stages(depth, block)
  projects = block == 'bottleneck'  # basic nets change shape by zero padding (option A)
  shapes = {}  # (h, cin, cout, k, stride) -> count
  last = collections.Counter()  # the shapes of units' last convs, which add the shortcut

  def add(key, count=1):
    shapes[key] = shapes.get(key, 0) + count

  size, cin = 32, 16
  add((32, 3, 16, 3, 1))
  for width, stride in zip(widths, (1, 2, 2)):
    for j in range(n):
      s = stride if j == 0 else 1
      c, h = (cin, size) if j == 0 else (width, size // stride)
      for i, (k, div) in enumerate(BLOCKS[block]):
        add((h, c, width // div, k, s if i == 0 else 1))
        if i == len(BLOCKS[block]) - 1 and (s == 1 or i > 0):
          last[(h, c, width // div, k, 1)] += 1
        h, c = (h // s if i == 0 else h), width // div
      if j == 0 and projects and (s != 1 or cin != width):
        add((size, cin, width, 1, s))
    size //= stride
    cin = width
  rows = []
  for (h, cin, cout, k, s), count in sorted(shapes.items()):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, h, h, cin)), dtype)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(k, k, cin, cout)), dtype)
    pad = ((k // 2, k // 2),) * 2
    plain = lambda x, w: layers.xla_conv(x, w, (s, s), pad)
    if k == 1:
      ours = lambda x, w: cpu_kernels.pointwise(x[:, ::s, ::s], w[0, 0])
    else:
      ours = lambda x, w: cpu_kernels.conv_canonical_grads(x, w, (s, s), pad)
    kernels = [('xla', plain), ('preact', ours)]
    if onednn.available():
      kernels.append(('onednn', lambda x, w: onednn.conv(x, w, (s, s), pad)))
    row = dict(h=h, cin=cin, cout=cout, k=k, stride=s, count=count)
    for name, f in kernels:
      fwd = jax.jit(f)
      grad = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w)), argnums=(0, 1)))
      jax.block_until_ready(fwd(x, w))
      jax.block_until_ready(grad(x, w))
      row[f'{name}_fwd_ms'] = 1e3 * _median_time(lambda: fwd(x, w), reps)
      row[f'{name}_fwd_bwd_ms'] = 1e3 * (_median_time(lambda: grad(x, w), reps) +
                                         _median_time(lambda: fwd(x, w), reps))
    if onednn.available() and (h, cin, cout, k, s) in last:
      row['last_count'] = last[(h, cin, cout, k, s)]
      shortcut = jnp.ones((batch, h, h, cout), dtype)
      fused = jax.jit(lambda x, w, r: onednn._conv_add(x, w, r, (1, 1), pad))
      in_turn = jax.jit(lambda x, w, r: onednn.conv(x, w, (1, 1), pad) + r)
      for name, f in (('fused', fused), ('in_turn', in_turn)):
        jax.block_until_ready(f(x, w, shortcut))
        row[f'onednn_add_{name}_fwd_ms'] = 1e3 * _median_time(lambda: f(x, w, shortcut),
                                                               reps)
    if torch_too and jnp.dtype(dtype) == jnp.float32:
      row.update(_torch_conv(batch, h, cin, cout, k, s, reps))
    rows.append(row)
  return rows


def _torch_conv(batch, h, cin, cout, k, s, reps) -> dict:
  try:
    import torch
  except ImportError:
    return {}
  torch.set_num_threads(os.cpu_count())
  x = torch.randn(batch, cin, h, h).to(memory_format=torch.channels_last).requires_grad_()
  conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, bias=False).to(
      memory_format=torch.channels_last)

  def fwd():
    with torch.no_grad():
      return conv(x)

  def fwd_bwd():
    conv(x).sum().backward()

  out = {}
  for name, f in (('torch_fwd_ms', fwd), ('torch_fwd_bwd_ms', fwd_bwd)):
    f()
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      f()
      times.append(time.perf_counter() - t)
    out[name] = 1e3 * statistics.median(times)
  return out
