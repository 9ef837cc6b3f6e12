"""The PyTorch reference of preact-bench: the same CIFAR ResNets, built from the same
placement table (so the same parameter count, which is asserted), the same batch and
input shape, SGD with Nesterov momentum and weight decay. Prints one JSON line.

  python -m preact.bench_torch --depth=164 --block=bottleneck --batch=128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
from torch import nn

from preact.models import cifar_stages
from preact.units import BLOCKS, PLACEMENTS


def _ops(names, channels):
  return [nn.BatchNorm2d(channels) if op == 'bn' else nn.ReLU() for op in names]


class Unit(nn.Module):
  """preact.units.ResidualUnit for one placement, identity or first-of-stage."""

  def __init__(self, placement, cin, cout, stride, block, first, activated, shortcut):
    super().__init__()
    p = PLACEMENTS[placement]
    self.before = nn.Sequential(*([] if activated else _ops(p.before, cin)))
    layers, c = [], cin
    for i, (k, div) in enumerate(BLOCKS[block]):
      if i:
        layers += _ops(('bn', 'relu'), c)
      layers.append(nn.Conv2d(c, cout // div, k, stride if i == 0 else 1, k // 2, bias=False))
      c = cout // div
    self.branch = nn.Sequential(*layers, *_ops(p.after_branch, cout))
    self.first, self.stride, self.pad = first, stride, cout - cin
    self.proj = None
    if (stride != 1 or cin != cout) and shortcut == 'projection':
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                *([nn.BatchNorm2d(cout)] if p.normalized_branch else []))
    self.after = nn.Sequential(*_ops(p.after_add, cout))

  def forward(self, x):
    y = self.before(x)
    h = y if self.first else x
    if self.proj is not None:
      h = self.proj(h)
    elif self.stride != 1 or self.pad:  # option A, NCHW
      h = nn.functional.pad(h[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.pad))
    return self.after(h + self.branch(y))


def cifar_resnet(depth, unit='full_preact', block='basic', channels=3, classes=10):
  n, widths = cifar_stages(depth, block)
  shortcut = 'projection' if block == 'bottleneck' else 'zero_pad'  # as cifar_resnet's auto
  p = PLACEMENTS[unit]
  layers = [nn.Conv2d(channels, 16, 3, 1, 1, bias=False), *_ops(('bn', 'relu'), 16)]
  cin = 16
  for s, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
    for j in range(n):
      layers.append(Unit(unit, cin, width, stride if j == 0 else 1, block, first=j == 0,
                         activated=s == j == 0, shortcut=shortcut))
      cin = width
  if p.raw_output:
    layers += _ops(('bn', 'relu'), cin)
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
  return nn.Sequential(*layers)


# torch.profiler's op names -> the kinds of preact.profile.KINDS.
_CONV_BWD = 'autograd::engine::evaluate_function: ConvolutionBackward0'
_BN = ('aten::native_batch_norm', 'aten::_native_batch_norm_legit',
       'aten::native_batch_norm_backward')
_KERNEL = 'preact::conv'  # + '1x1' or '3x3': a label around each Conv2d call


def torch_kind(event, kernel_of_seq: dict) -> str:
  """The kind of a profiled op, from itself and its callers: a conv (by its kernel's
  size) or BN op, or anything else, forward or backward; the optimizer and loss apart.
  ``kernel_of_seq`` maps a forward conv's autograd sequence number to its kernel size,
  which is how a backward conv is told apart."""
  chain, e = [], event
  while e is not None:
    chain.append(e)
    e = e.cpu_parent
  names = [e.name for e in chain]
  if any(n.startswith('Optimizer.') or 'AccumulateGrad' in n for n in names) or \
      'aten::cross_entropy_loss' in names:
    return 'loss, optimizer, rest'
  direction = 'bwd' if any(n.startswith('autograd::engine') for n in names) else 'fwd'
  for e in chain:
    if e.name.startswith(_KERNEL):
      return f'conv {e.name[len(_KERNEL):]} fwd'
    if e.name == _CONV_BWD and e.sequence_nr in kernel_of_seq:
      return f'conv {kernel_of_seq[e.sequence_nr]} bwd'
    if e.name in _BN:
      return f'batch norm {direction}'
  return f'relu, add, other {direction}'


def profile(step, model, steps=2) -> dict:
  """Per-step ms of the step's ops by kind (self time, so nothing is counted twice),
  after one profiled warm-up step (the profiler's first step runs slower). Shapes are
  not recorded (that doubles the step's time); convs are labeled by hooks instead."""
  from torch.autograd.profiler import record_function
  from torch.profiler import ProfilerActivity, profile as torch_profile, schedule
  hooks, open_labels = [], []
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      k = f'{m.kernel_size[0]}x{m.kernel_size[1]}'
      hooks.append(m.register_forward_pre_hook(
          lambda *_, k=k: open_labels.append(record_function(_KERNEL + k).__enter__())))
      hooks.append(m.register_forward_hook(
          lambda *_: open_labels.pop().__exit__(None, None, None)))
  events = []
  try:
    with warnings.catch_warnings(), torch_profile(activities=[ProfilerActivity.CPU],
                       schedule=schedule(wait=0, warmup=1, active=steps),
                       on_trace_ready=lambda p: events.extend(p.events())) as prof:
      # The warm-up-to-active switch warns that events are kept per cycle: there is one.
      warnings.filterwarnings('ignore', '.*Profiler clears events')
      for _ in range(1 + steps):
        step()
        prof.step()
  finally:
    for h in hooks:
      h.remove()
  # A label's aten::convolution carries the sequence number its backward node gets
  # (under autocast, its conv2d is numbered with the weight's cast instead).
  kernel_of_seq = {}
  for e in events:
    if e.name == 'aten::convolution' and e.sequence_nr >= 0:
      label = e.cpu_parent
      while label is not None and not label.name.startswith(_KERNEL):
        label = label.cpu_parent
      if label is not None:
        kernel_of_seq[e.sequence_nr] = label.name[len(_KERNEL):]
  out = {}
  for e in events:
    if e.self_cpu_time_total:
      kind = torch_kind(e, kernel_of_seq)
      out[kind] = out.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / steps
  return out


def main():
  a = argparse.ArgumentParser()
  a.add_argument('--depth', type=int, default=164)
  a.add_argument('--unit', default='full_preact', choices=list(PLACEMENTS))
  a.add_argument('--block', default='bottleneck', choices=list(BLOCKS))
  a.add_argument('--batch', type=int, default=128)
  a.add_argument('--image_shape', default='32,32,3')
  a.add_argument('--steps', type=int, default=10)
  a.add_argument('--warmup', type=int, default=2)
  a.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  a.add_argument('--expect_params', type=int, default=None)
  a.add_argument('--channels_last', type=int, default=1)
  a.add_argument('--profile', action='store_true', help='Add per-kind op times.')
  args = a.parse_args()
  torch.set_num_threads(os.cpu_count())
  h, w, c = map(int, args.image_shape.split(','))
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = cifar_resnet(args.depth, args.unit, args.block, c).to(device)
  params = sum(p.numel() for p in model.parameters())
  if args.expect_params is not None:
    assert params == args.expect_params, f'PyTorch net has {params} params, ours {args.expect_params}'
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                        weight_decay=1e-4)
  x = torch.randn(args.batch, c, h, w, device=device).to(memory_format=fmt)
  y = torch.randint(0, 10, (args.batch,), device=device)
  loss_fn = nn.CrossEntropyLoss()

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16'):
      loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  s = statistics.median(times)
  out = dict(framework='pytorch', version=torch.__version__, params=params,
             batch=args.batch, dtype=args.dtype, step_ms=1e3 * s,
             images_per_s=args.batch / s, device=device, threads=torch.get_num_threads())
  if args.profile:
    out['ms_by_kind'] = profile(step, model)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
