"""Times preact.onednn against preact.cpu_kernels (XLA) and PyTorch at ResNet-164's
first-stage shapes (batch 128, 32×32): forward, and forward+backward (a training step's
cost of the op), median milliseconds.

    python -m preact.onednn.bench [--batch 128] [--repeat 10] [--dtype float32|bfloat16]
                                  [--only conv3x3,conv1x1_16_64,conv1x1_64_16,bn,bn_relu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_ms(fn, repeat):
  fn()
  fn()  # compile, warm caches
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def _jax_times(op, args, cotangent, repeat):
  fwd = jax.jit(op)
  step = jax.jit(lambda *a: jax.vjp(op, *a)[1](cotangent(*a)))
  block = lambda f: (lambda: jax.block_until_ready(f(*args)))
  return _median_ms(block(fwd), repeat), _median_ms(block(step), repeat)


def _torch_times(op, args, repeat):
  import torch

  def fwd():
    with torch.no_grad():
      op(*args)

  def step():
    for a in args:
      a.grad = None
    out = op(*args)
    out.backward(torch.ones_like(out))

  return _median_ms(fwd, repeat), _median_ms(step, repeat)


def cases(batch):
  # name, x shape (NHWC), kernel shape (HWIO) or None for batch norm
  return [('conv3x3', (batch, 32, 32, 16), (3, 3, 16, 16)),
          ('conv1x1_16_64', (batch, 32, 32, 16), (1, 1, 16, 64)),
          ('conv1x1_64_16', (batch, 32, 32, 64), (1, 1, 64, 16)),
          ('bn', (batch, 32, 32, 64), None),
          ('bn_relu', (batch, 32, 32, 64), None)]


def main(argv=None):
  from preact import cpu_kernels, onednn
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--repeat', type=int, default=10)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--only', default='')
  p.add_argument('--no-torch', action='store_true')
  a = p.parse_args(argv)
  if not onednn.available():
    raise SystemExit(f'preact.onednn unavailable: {onednn.why_unavailable()}')
  dtype = jnp.dtype(a.dtype)
  torch = None
  if not a.no_torch:
    try:
      import torch
    except ImportError:
      pass
  print(f'{jax.devices()[0].device_kind}, {a.dtype}, batch {a.batch}, median of {a.repeat}; '
        f'torch threads {torch.get_num_threads() if torch else "-"}')
  print(f'{"op":<15}{"pass":<9}{"onednn":>9}{"xla":>9}{"torch":>9}   (ms)')
  rng = np.random.default_rng(0)
  for name, xs, ks in cases(a.batch):
    if a.only and name not in a.only.split(','):
      continue
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    if ks is not None:
      w = jnp.asarray(rng.standard_normal(ks) / np.sqrt(np.prod(ks[:3])), dtype)
      pad = ((ks[0] // 2,) * 2,) * 2
      args = (x, w)
      make = lambda f: (lambda x, w: f(x, w, (1, 1), pad))
      ours = make(onednn.conv)
      ref = make(cpu_kernels.conv)
      ones = lambda x, w: jnp.ones((xs[0], xs[1], xs[2], ks[3]), dtype)
    else:
      c = xs[3]
      scale, bias = jnp.ones((c,)), jnp.zeros((c,))
      args = (x, scale, bias)
      relu = name == 'bn_relu'

      def make(f, fused=None):
        def op(x, s, b):
          if fused is not None:
            return fused(x, s, b, 1e-5, None)[0]
          y = f(x, s, b, 1e-5, None)[0]
          return jax.nn.relu(y) if relu else y
        return op

      ours = make(None, onednn.batch_norm_relu_train) if relu else make(
          onednn.batch_norm_train)
      ref = make(cpu_kernels.batch_norm_train)
      ones = lambda x, s, b: jnp.ones(xs, jnp.result_type(x, s))
    t_ours = _jax_times(ours, args, ones, a.repeat)
    t_ref = _jax_times(ref, args, ones, a.repeat)
    t_torch = (float('nan'), float('nan'))
    if torch is not None:
      tdt = torch.float32 if a.dtype == 'float32' else torch.bfloat16
      tx = torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2).to(
          dtype=tdt, memory_format=torch.channels_last).requires_grad_()
      if ks is not None:
        tw = torch.tensor(np.asarray(w, np.float32)).permute(3, 2, 0, 1).contiguous().to(
            dtype=tdt, memory_format=torch.channels_last).requires_grad_()
        pd = ks[0] // 2
        t_torch = _torch_times(lambda x, w: torch.nn.functional.conv2d(x, w, padding=pd),
                               (tx, tw), a.repeat)
      else:
        ts = torch.ones(xs[3], requires_grad=True)
        tb = torch.zeros(xs[3], requires_grad=True)

        def tbn(x, s, b):
          y = torch.nn.functional.batch_norm(x, None, None, s, b, training=True, eps=1e-5)
          return torch.relu(y) if relu else y

        t_torch = _torch_times(tbn, (tx, ts, tb), a.repeat)
    for i, pass_ in enumerate(('fwd', 'fwd+bwd')):
      print(f'{name:<15}{pass_:<9}{t_ours[i]:9.2f}{t_ref[i]:9.2f}{t_torch[i]:9.2f}', flush=True)


if __name__ == '__main__':
  main()
