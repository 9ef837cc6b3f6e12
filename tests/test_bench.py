"""The benchmark harness: the PyTorch reference is the same network, and the bench
reports what it promises. (Speed itself is measured by preact-bench, not asserted.)"""

import pytest

from preact import bench, models, onednn, units


@pytest.mark.slow
@pytest.mark.parametrize('placement', list(units.PLACEMENTS))
def test_pytorch_reference_has_our_parameter_count(placement):
  torch_ref = pytest.importorskip('preact.bench_torch')
  for depth, block in ((20, 'basic'), (29, 'bottleneck')):
    ours = models.count_params(models.init_shapes(
        models.cifar_resnet(depth, placement, block), (32, 32, 3))['params'])
    theirs = sum(p.numel() for p in torch_ref.cifar_resnet(depth, placement,
                                                           block).parameters())
    assert theirs == ours


@pytest.mark.slow
def test_bench_train_reports_speed_memory_and_mfu():
  model = bench.cifar_model(8, 'basic')
  r = bench.bench_train(model, batch=8, steps=2, warmup=1, peak_flops=bench.matmul_peak(n=512))
  for key in ('images_per_s', 'step_ms', 'compile_s', 'peak_mem_gb', 'mfu', 'flops_per_image'):
    assert r[key] > 0, key
  assert r['params'] == 75_290 and r['mfu'] < 1  # ResNet-8, option-A shortcuts
  assert r['images_per_s'] == pytest.approx(8 / (r['step_ms'] / 1e3))


@pytest.mark.slow
def test_remat_plans_less_memory_and_compile_only_runs_nothing():
  plain = bench.bench_train(bench.cifar_model(20, 'basic', scan='on'), batch=8, steps=0)
  remat = bench.bench_train(bench.cifar_model(20, 'basic', scan='on', remat='on'), batch=8,
                            steps=0)
  assert plain['step_ms'] != plain['step_ms']  # NaN: compiled, not run
  assert 0 < remat['peak_mem_gb'] < plain['peak_mem_gb']


def test_pipeline_throughput_is_measured_without_tfds():
  import numpy as np
  images = np.zeros((100, 32, 32, 3), np.uint8)
  labels = np.zeros((100,), np.int32)
  assert bench.pipeline_images_per_s(images, labels, batch=16, padding=4, steps=3) > 0


@pytest.mark.slow
@pytest.mark.parametrize('cpu_kernels', [
    pytest.param('onednn', marks=pytest.mark.skipif(not onednn.available(),
                                                    reason='oneDNN kernels not built')),
    'xla', 'off'])
def test_profile_puts_every_executed_op_of_the_step_in_a_kind(cpu_kernels):
  from preact import profile
  # Two units a stage: the scanned bodies' ops are counted on every trip.
  r = bench.op_profile(bench.cifar_model(20, 'bottleneck', cpu_kernels=cpu_kernels), batch=4,
                       steps=1, attempts=1)
  assert r['unknown_ops'] == 0
  assert list(r['ms_by_kind']) == list(profile.KINDS)
  assert r['op_ms_total'] == pytest.approx(sum(r['ms_by_kind'].values()))
  assert 0 < r['op_ms_total'] <= r['op_ms_raw'] * (1 + 1e-9)
  assert r['op_ms_total'] <= r['traced_step_ms'] * (1 + 1e-9)  # each instant counted once
  for kind in profile.KINDS[:6]:  # both conv sizes and BN, forward and backward
    assert r['ms_by_kind'][kind] > 0, kind
  assert r['ms_by_kind']['copies, layout, scan'] > 0  # the scan's stacked activations
  assert all(o['kind'] in profile.KINDS for o in r['top_ops'])


@pytest.mark.parametrize('autocast', [False, True], ids=['float32', 'bfloat16'])
def test_pytorch_profile_uses_the_same_kinds(autocast):
  torch_ref = pytest.importorskip('preact.bench_torch')
  import torch
  from preact import profile
  net = torch_ref.cifar_resnet(11, block='bottleneck')
  x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

  def step():  # bfloat16 as the reference runs it: under autocast, which casts weights
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
      loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()

  kinds = torch_ref.profile(step, net, steps=1)
  assert set(kinds) <= set(profile.KINDS)
  for kind in profile.KINDS[:6]:
    assert kinds.get(kind, 0) > 0, kind


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_conv_profile_times_every_conv_shape_and_the_fused_shortcut_sum(dtype):
  rows = bench.conv_profile(11, 'bottleneck', batch=2, reps=1, torch_too=False, dtype=dtype)
  # ResNet-11: the stem, 3 units of 1×1-3×3-1×1 convs, 3 projections (stage 1's has
  # the shape of its unit's last conv).
  assert sum(r['count'] for r in rows) == 1 + 3 * 3 + 3
  for r in rows:
    assert r['xla_fwd_ms'] > 0 and r['preact_fwd_bwd_ms'] > 0
  fused = [r for r in rows if 'onednn_add_fused_fwd_ms' in r]
  if onednn.available():  # the 1×1 expansion ending each of the 3 units
    assert [(r['k'], r['stride'], r['cout'] == 4 * r['cin'], r['last_count'])
            for r in fused] == [(1, 1, True, 1)] * 3
    assert all(r['onednn_add_in_turn_fwd_ms'] > 0 for r in fused)
  else:
    assert not fused


def test_overlapping_op_events_share_the_wall_time_once():
  from preact import profile
  # b's event opens while a runs (b waits on it), c runs inside d's event, e alone.
  events = [('a', 0, 10), ('b', 2, 12), ('d', 20, 30), ('c', 23, 25), ('e', 40, 41)]
  assert profile.wall_time_by_op(events) == {'a': 10, 'b': 2, 'c': 2, 'd': 8, 'e': 1}
  assert profile.wall_time_by_op([('a', 0, 5), ('a', 5, 7)]) == {'a': 7}
  # Closing together: the op that opened later ran inside the other.
  assert profile.wall_time_by_op([('z', 0, 10), ('a', 5, 10)]) == {'z': 5, 'a': 5}
  assert profile.wall_time_by_op([]) == {}
