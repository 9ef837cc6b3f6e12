"""preact-bench: the train step's speed, memory and MFU, beside PyTorch; no TensorFlow.

  preact-bench --depth=164 --block=bottleneck --batch=128 --dtype=float32 --json
  preact-bench --depth=164 --torch                     # + the PyTorch reference, ratio
  preact-bench --mode=compile                          # ResNet-164 vs ResNet-1001 compile
  preact-bench --mode=sweep                            # depths × scan, remat memory
  preact-bench --mode=pipeline                         # input pipeline vs train step
  preact-bench --mode=ops                              # per-conv profile vs PyTorch
  preact-bench --mode=profile --torch                  # the step's time per kind of op
"""

from __future__ import annotations

import json

from absl import flags

from preact.cli import common

_MODE = flags.DEFINE_enum('mode', 'step', ['step', 'compile', 'sweep', 'pipeline', 'ops',
                                            'profile'],
                          'What to measure.')
_DEPTH = flags.DEFINE_integer('depth', 164, 'CIFAR depth.')
_BLOCK = flags.DEFINE_string('block', 'bottleneck', 'basic | bottleneck | one_layer '
                             '(preact.units.BLOCKS).')
_UNIT = flags.DEFINE_string('unit', 'full_preact', 'Unit variant.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Global batch.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Computation dtype.')
_SCAN = flags.DEFINE_enum('scan', 'auto', ['auto', 'on', 'off'],
                          'Scan identical units (auto: as model.scan=auto; --mode=compile: on).')
_REMAT = flags.DEFINE_enum('remat', 'auto', ['auto', 'on', 'off'],
                           'Rematerialize units (auto: on for CPU from depth 56).')
_CPU_KERNELS = flags.DEFINE_enum('cpu_kernels', 'auto', ['auto', 'onednn', 'xla', 'off'],
                                 'CPU conv and BN kernels, as model.cpu_kernels.')
_PAR = flags.DEFINE_enum('parallelism', 'none', ['none', 'pmap', 'shard_map'],
                         'none: one device, the step alone.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (median).')
_TORCH = flags.DEFINE_bool('torch', False, 'Also run the PyTorch reference (needs torch).')
_DEPTHS = flags.DEFINE_list('depths', None, 'Depths for --mode=compile/sweep.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')
_PROBE_EVERY = flags.DEFINE_integer('probe_every', None, 'The in-training probe interval '
                                    'that probe_overhead_pct is for (default: the config '
                                    "default, preact.config.base's probe_every).")
for _flag in ('depth', 'batch', 'steps'):
  flags.register_validator(_flag, lambda v: v is not None and v > 0,
                           message=f'--{_flag} must be a positive integer')
flags.register_validator('probe_every', lambda v: v is None or v > 0,
                         message='--probe_every must be a positive integer')
flags.register_validator(
    'depths', lambda v: v is None or all(d.strip().isdigit() and int(d) > 0 for d in v),
    message='--depths takes positive integers separated by commas, e.g. 164,1001')


@common.main('preact-bench')
def main(argv):
  common.no_arguments(argv)
  from preact import bench
  out = {'compile': _compile, 'sweep': _sweep, 'pipeline': _pipeline, 'ops': _ops,
         'step': _step, 'profile': _profile}[_MODE.value](bench)
  print(json.dumps(out) if _JSON.value else _table(out), flush=True)


def _model(bench, depth=None, block=None, **kw):
  args = dict(unit=_UNIT.value, dtype=_DTYPE.value, scan=_SCAN.value, remat=_REMAT.value,
              cpu_kernels=_CPU_KERNELS.value)
  args.update(kw)
  try:
    return bench.cifar_model(depth or _DEPTH.value, block or _BLOCK.value, **args)
  except common.UserError:
    raise
  except ValueError as e:
    raise common.UserError(str(e)) from None


def _step(bench):
  model = _model(bench)
  # On a shared host the speed drifts over minutes: PyTorch runs just before and just
  # after ours, and the ratio is against the mean of the two.
  torch_runs = [_torch(bench, model)] if _TORCH.value else []
  peak = bench.matmul_peak(_DTYPE.value)
  ours = bench.bench_train(model, _BATCH.value, steps=_STEPS.value,
                           parallelism=_PAR.value, peak_flops=peak)
  ours.update(depth=_DEPTH.value, unit=_UNIT.value,
              eval_images_per_s=bench.bench_eval(model, image_shape=(32, 32, 3)))
  # The in-training probe (config.probe_every) as a share of the training time.
  from preact import config as config_lib
  every = _PROBE_EVERY.value or config_lib.base().probe_every
  ours.update(probe_ms=bench.bench_probe(model), probe_every=every)
  ours['probe_overhead_pct'] = 100 * ours['probe_ms'] / (every * ours['step_ms'])
  if torch_runs:
    torch_runs.append(_torch(bench, model))
    mean = lambda key: sum(r[key] for r in torch_runs) / len(torch_runs)
    ours['torch'] = dict(torch_runs[0], images_per_s=mean('images_per_s'),
                         step_ms=mean('step_ms'))
    ours['torch_runs'] = torch_runs
    ours['ratio_vs_torch'] = ours['images_per_s'] / ours['torch']['images_per_s']
    ours['ratio_vs_faster_torch'] = ours['images_per_s'] / max(r['images_per_s']
                                                               for r in torch_runs)
  return ours


def _torch(bench, model, steps=None, **kw):
  """The PyTorch reference of this network (its parameter count asserted equal)."""
  params = bench.models.count_params(bench.models.init_shapes(model, (32, 32, 3))['params'])
  ref = bench.torch_reference(_DEPTH.value, _BLOCK.value, _UNIT.value, _BATCH.value,
                              steps=steps or _STEPS.value, expect_params=params,
                              dtype=_DTYPE.value, **kw)
  if ref is None:
    raise common.UserError('--torch needs PyTorch: pip install -e ".[bench]"')
  return ref


def _compile(bench):
  depths = [int(d) for d in (_DEPTHS.value or [164, 1001])]
  # The same build at every depth, so that the ratio is what depth alone costs.
  scan = 'on' if _SCAN.value == 'auto' else _SCAN.value
  times = bench.compile_times(depths, _BLOCK.value, _BATCH.value, _DTYPE.value, scan,
                              _REMAT.value)
  out = {'compile_s': {str(d): t for d, t in times.items()}, 'scan': scan}
  if len(depths) == 2:
    out['ratio'] = times[depths[1]] / times[depths[0]]
  return out


def _sweep(bench):
  from preact import paper
  depths = [int(d) for d in (_DEPTHS.value or [20, 56, 110, 164, 1001])]
  rows = []
  for depth in depths:
    block = paper.block(depth)
    for scan in (True, False):
      if not scan and depth > 164:
        continue  # unrolled 1001 compiles for many minutes; that is the point of scan
      # Without remat ResNet-1001's activations outgrow a small host: plan, don't run.
      steps = 0 if depth > 164 else max(2, _STEPS.value // 3)
      r = bench.bench_train(_model(bench, depth, block, scan='on' if scan else 'off',
                                   remat='off'),
                            _BATCH.value, steps=steps, warmup=1)
      rows.append(dict(depth=depth, block=block, scan=scan, remat=False,
                       compile_s=r['compile_s'], step_ms=r['step_ms'] if steps else None,
                       peak_mem_gb=r['peak_mem_gb']))
    r = bench.bench_train(_model(bench, depth, block, scan='on', remat='on'),
                          _BATCH.value, steps=max(2, _STEPS.value // 3), warmup=1)
    rows.append(dict(depth=depth, block=block, scan=True, remat=True,
                     compile_s=r['compile_s'], step_ms=r['step_ms'],
                     peak_mem_gb=r['peak_mem_gb'], rss_gb=r['rss_gb']))
  return {'sweep': rows}


def _pipeline(bench):
  import numpy as np
  rng = np.random.default_rng(0)
  cifar = rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
  fmnist = rng.integers(0, 256, (60_000, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 60_000).astype(np.int32)
  step = bench.bench_train(_model(bench), _BATCH.value, steps=_STEPS.value)
  pipe_cifar = bench.pipeline_images_per_s(cifar, labels[:50_000], _BATCH.value, 4)
  pipe_fmnist = bench.pipeline_images_per_s(fmnist, labels, _BATCH.value, 0)
  return dict(train_images_per_s=step['images_per_s'], depth=_DEPTH.value,
              pipeline_cifar_images_per_s=pipe_cifar,
              pipeline_fashion_mnist_images_per_s=pipe_fmnist,
              ratio_cifar=pipe_cifar / step['images_per_s'],
              ratio_fashion_mnist=pipe_fmnist / step['images_per_s'])


def _ops(bench):
  rows = bench.conv_profile(_DEPTH.value, _BLOCK.value, _BATCH.value, _STEPS.value // 2 or 1,
                           dtype=_DTYPE.value)
  # A fused-sum column counts only the units' last convs of its shape.
  count = lambda r, k: r.get('last_count', 0) if k.startswith('onednn_add_') else r['count']
  totals = {k: sum(r.get(k, 0.0) * count(r, k) for r in rows)
            for k in sorted({k for r in rows for k in r if k.endswith('_ms')})}
  return {'convs': rows, 'total_ms': totals}


def _profile(bench):
  """The train step's op time by kind (preact.profile), ours beside PyTorch's."""
  model = _model(bench)
  ours = bench.op_profile(model, _BATCH.value)
  out = dict(depth=_DEPTH.value, batch=_BATCH.value, dtype=_DTYPE.value, remat=model.remat,
             scan=model.scan, ours=ours)
  if _TORCH.value:
    out['torch'] = _torch(bench, model, steps=3, warmup=1, profile=True)
  return out


def _table(out):
  if 'ours' in out:
    from preact import profile
    return profile.table(out)
  return '\n'.join(f'{k:<28} {v:.4g}' if isinstance(v, float) else f'{k:<28} {v}'
                   for k, v in out.items())


def run():
  common.run(main)


if __name__ == '__main__':
  run()
