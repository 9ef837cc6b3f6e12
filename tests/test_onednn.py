"""preact.onednn: oneDNN's conv and batch norm through JAX's FFI, against the XLA
formulations they replace (preact.layers.xla_conv, preact.cpu_kernels.batch_norm_train).

Skipped when the library cannot be built or loaded (no g++ / libdnnl-dev).
"""
import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from preact import cpu_kernels, layers, onednn
from preact.onednn import build

# Skipped only where oneDNN or a compiler is missing (setup installs both where apt can);
# a library that fails to build or load where they are present fails the tests below.
_BUILT, _LINE = build.build()  # before anything loads it; a no-op when up to date
if not _BUILT and isinstance(build.command(), str):
  pytest.skip(f'oneDNN kernels cannot be built here: {_LINE}', allow_module_level=True)
if 'PREACT_ONEDNN' in onednn.why_unavailable():
  pytest.skip('oneDNN kernels turned off (PREACT_ONEDNN)', allow_module_level=True)


def test_the_library_builds_and_loads():
  assert _BUILT, _LINE
  assert onednn.available(), onednn.why_unavailable()

# (spatial size, in channels, kernel size, out channels, stride): every conv of
# ResNet-20 (basic units) and ResNet-164 (bottleneck units, projection shortcuts) on
# CIFAR, as the models build them.
RESNET20 = [(32, 3, 3, 16, 1), (32, 16, 3, 16, 1), (32, 16, 3, 32, 2), (16, 32, 3, 32, 1),
            (16, 32, 3, 64, 2), (8, 64, 3, 64, 1)]
RESNET164 = [(32, 3, 3, 16, 1), (32, 16, 1, 64, 1), (32, 16, 1, 16, 1), (32, 16, 3, 16, 1),
             (32, 64, 1, 16, 1), (32, 64, 1, 128, 2), (32, 64, 1, 32, 2), (16, 32, 3, 32, 1),
             (16, 32, 1, 128, 1), (16, 128, 1, 32, 1), (16, 128, 1, 256, 2),
             (16, 128, 1, 64, 2), (8, 64, 3, 64, 1), (8, 64, 1, 256, 1), (8, 256, 1, 64, 1)]
CONV_SHAPES = sorted(set(RESNET20 + RESNET164))
BATCH = 2


def _pad(k):
  return ((k // 2, k // 2), (k // 2, k // 2))


def _conv_case(key, size, cin, k, cout, stride, dtype):
  kx, kw, kg = jax.random.split(key, 3)
  x = jax.random.normal(kx, (BATCH, size, size, cin)).astype(dtype)
  w = (jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(dtype)
  out = (size + 2 * (k // 2) - k) // stride + 1
  dy = jax.random.normal(kg, (BATCH, out, out, cout)).astype(dtype)
  return x, w, dy


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _value_and_grads(op, x, w, dy, strides, padding):
  y, vjp = jax.vjp(lambda a, b: op(a, b, strides, padding), x, w)
  return (y,) + vjp(dy)


def _close(ours, ref, rtol, atol, what):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, what
  np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol, err_msg=what)


def _close_scaled(ours, ref, tol, what):
  """|ours − ref| ≤ tol · max|ref| (bfloat16: errors scale with the largest value)."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, what
  err, scale = np.abs(ours - ref).max(), max(np.abs(ref).max(), 1e-6)
  assert err <= tol * scale, f'{what}: max error {err} > {tol} × {scale}'


@pytest.mark.parametrize('shape', CONV_SHAPES, ids=lambda s: 'x{}c{}k{}o{}s{}'.format(*s))
def test_conv_float32(shape):
  size, cin, k, cout, stride = shape
  x, w, dy = _conv_case(jax.random.key(sum(shape)), *shape, jnp.float32)
  args = (x, w, dy, (stride, stride), _pad(k))
  ours = _value_and_grads(onednn.conv, *args)
  ref = _value_and_grads(layers.xla_conv, *args)
  for o, r, what in zip(ours, ref, ('y', 'dx', 'dw')):
    assert o.dtype == r.dtype == jnp.float32
    _close(o, r, 1e-4, 1e-4 if what == 'dw' else 1e-5, f'{what} {shape}')


@pytest.mark.parametrize('shape', CONV_SHAPES, ids=lambda s: 'x{}c{}k{}o{}s{}'.format(*s))
def test_conv_bfloat16(shape):
  size, cin, k, cout, stride = shape
  x, w, dy = _conv_case(jax.random.key(sum(shape)), *shape, jnp.bfloat16)
  strides, padding = (stride, stride), _pad(k)
  ours = _value_and_grads(onednn.conv, x, w, dy, strides, padding)
  # The reference: the same bfloat16 numbers, computed in float32.
  f32 = lambda a: a.astype(jnp.float32)
  ref = _value_and_grads(layers.xla_conv, f32(x), f32(w), f32(dy), strides, padding)
  for o, r, what in zip(ours, ref, ('y', 'dx', 'dw')):
    assert o.dtype == jnp.bfloat16
    _close_scaled(o, r, 1e-2, f'{what} {shape}')


# The last conv of each residual branch (stride 1) and the addend it takes: the unit's
# shortcut, of the output's shape.
LAST_CONVS = [s for s in CONV_SHAPES if s[4] == 1 and s[1] != 3]


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _conv_add_grads(op, x, w, h, dy, strides, padding):
  y, vjp = jax.vjp(lambda a, b, c: op(a, b, strides, padding, c), x, w, h)
  return (y,) + vjp(dy)


def _plain_conv_add(x, w, strides, padding, h):
  return layers.xla_conv(x, w, strides, padding) + h


@pytest.mark.parametrize('shape', LAST_CONVS, ids=lambda s: 'x{}c{}k{}o{}'.format(*s))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
def test_conv_add(shape, dtype):
  """conv + addend in one oneDNN pass (bfloat16): the value and the three gradients of
  the conv and the sum done in turn, rounded once instead of twice."""
  size, cin, k, cout, stride = shape
  x, w, dy = _conv_case(jax.random.key(sum(shape)), *shape, dtype)
  h = jax.random.normal(jax.random.key(7), dy.shape).astype(dtype)
  args = (x, w, h, dy, (1, 1), _pad(k))
  f32 = lambda a: a.astype(jnp.float32)
  ours = _conv_add_grads(onednn.conv_add, *args)
  ref = _conv_add_grads(_plain_conv_add, *map(f32, args[:4]), *args[4:])
  for o, r, what in zip(ours, ref, ('y', 'dx', 'dw', 'dh')):
    assert o.dtype == dtype
    _close_scaled(o, r, 1e-2 if dtype == jnp.bfloat16 else 1e-5, f'{what} {shape}')
  hlo = jax.jit(onednn.conv_add, static_argnums=(2, 3)).lower(
      x, w, (1, 1), _pad(k), h).as_text()
  # Fused in bfloat16; in float32 oneDNN 2.6's fused kernels are slower, and the sum
  # is the plain one, bit for bit.
  assert ('preact_onednn_conv_fwd_add' in hlo) == (dtype == jnp.bfloat16)
  if dtype == jnp.float32:
    np.testing.assert_array_equal(ours[0], onednn.conv(x, w, (1, 1), _pad(k)) + h)


def test_conv_add_falls_back_where_it_cannot_fuse():
  x, w, _ = _conv_case(jax.random.key(0), 8, 4, 3, 4, 1, jnp.bfloat16)
  h32 = jnp.ones((BATCH, 8, 8, 4), jnp.float32)  # another dtype: promoted as by +
  out = onednn.conv_add(x, w, (1, 1), _pad(3), h32)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, onednn.conv(x, w, (1, 1), _pad(3)) + h32)
  row = jnp.ones((8, 4), jnp.bfloat16)  # broadcast, not the output's shape
  np.testing.assert_array_equal(onednn.conv_add(x, w, (1, 1), _pad(3), row),
                                onednn.conv(x, w, (1, 1), _pad(3)) + row)


def test_conv_falls_back_to_xla():
  x = jnp.ones((1, 8, 8, 4), jnp.float16)
  w = jnp.ones((3, 3, 4, 4), jnp.float16)
  np.testing.assert_array_equal(onednn.conv(x, w, (1, 1), _pad(3)),
                                layers.xla_conv(x, w, (1, 1), _pad(3)))
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_allclose(onednn.conv(x32, w32, (1, 1), 'SAME'),
                             layers.xla_conv(x32, w32, (1, 1), 'SAME'))


def test_conv_asymmetric_padding():
  x, w, dy = _conv_case(jax.random.key(1), 9, 8, 3, 8, 2, jnp.float32)
  dy = dy[:, :4, :4]
  args = (x, w, dy, (2, 2), ((0, 1), (1, 0)))
  for o, r in zip(_value_and_grads(onednn.conv, *args),
                  _value_and_grads(layers.xla_conv, *args)):
    _close(o, r, 1e-4, 1e-4, 'asymmetric')


# ----------------------------------------------------------------- batch norm ----

BN_SHAPES = [(BATCH, 32, 32, 16), (BATCH, 16, 16, 32), (BATCH, 8, 8, 64), (BATCH, 32, 32, 64),
             (BATCH, 16, 16, 128), (BATCH, 8, 8, 256)]


def _bn_case(key, shape, dtype):
  kx, ks, kb, kg = jax.random.split(key, 4)
  c = shape[-1]
  x = (jax.random.normal(kx, shape) * 2 + jax.random.normal(kb, (c,))).astype(dtype)
  scale = 1 + 0.5 * jax.random.normal(ks, (c,))
  bias = 0.3 * jax.random.normal(kb, (c,))
  g = jax.random.normal(kg, shape)
  return x, scale, bias, g


@functools.partial(jax.jit, static_argnums=(0,))
def _bn_value_and_grads(fn, x, scale, bias, g):
  (y, mean, var), vjp = jax.vjp(lambda *a: fn(*a, 1e-5, None), x, scale, bias)
  zeros = jnp.zeros_like(mean)
  return (y, mean, var) + vjp((g.astype(y.dtype), zeros, zeros))


def _reference_relu(x, scale, bias, epsilon, axis_name):
  y, mean, var = cpu_kernels.batch_norm_train(x, scale, bias, epsilon, axis_name)
  return jax.nn.relu(y), mean, var


@pytest.mark.parametrize('relu', [False, True], ids=['bn', 'bn_relu'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('shape', BN_SHAPES, ids=lambda s: 'x{}c{}'.format(s[1], s[3]))
def test_batch_norm(shape, dtype, relu):
  x, scale, bias, g = _bn_case(jax.random.key(shape[-1]), shape, dtype)
  ours = _bn_value_and_grads(functools.partial(onednn.batch_norm_train, relu=relu),
                             x, scale, bias, g)
  ref = _bn_value_and_grads(_reference_relu if relu else cpu_kernels.batch_norm_train,
                            x, scale, bias, g)
  for o, r, what in zip(ours, ref, ('y', 'mean', 'var', 'dx', 'dscale', 'dbias')):
    assert o.dtype == r.dtype, what
    if dtype == jnp.float32:
      _close(o, r, 1e-4, 1e-4 if what in ('dscale', 'dbias') else 1e-5, what)
    else:
      _close_scaled(o, r, 2e-2, what)


@pytest.mark.parametrize('relu', [False, True])
def test_batch_norm_inference(relu):
  x, scale, bias, g = _bn_case(jax.random.key(3), (BATCH, 8, 8, 32), jnp.float32)
  mean, var = x.mean((0, 1, 2)) + 0.1, x.var((0, 1, 2)) * 1.5

  def ref(*a):
    y = cpu_kernels._normalize(*a, 1e-5)
    return jax.nn.relu(y) if relu else y

  y, vjp = jax.vjp(lambda *a: onednn.batch_norm_inference(*a, 1e-5, relu),
                   x, mean, var, scale, bias)
  y_ref, vjp_ref = jax.vjp(ref, x, mean, var, scale, bias)
  _close(y, y_ref, 1e-5, 1e-5, 'y')
  for o, r in zip(vjp(g), vjp_ref(g)):
    _close(o, r, 1e-4, 1e-4, 'grad')


def test_batch_norm_across_replicas_is_xla():
  x, scale, bias, _ = _bn_case(jax.random.key(4), (4, 4, 4, 8), jnp.float32)
  xs = x.reshape(2, 2, 4, 4, 8)
  ours = jax.vmap(lambda a: onednn.batch_norm_train(a, scale, bias, 1e-5, 'i'),
                  axis_name='i')(xs)
  ref = jax.vmap(lambda a: cpu_kernels.batch_norm_train(a, scale, bias, 1e-5, 'i'),
                 axis_name='i')(xs)
  for o, r in zip(ours, ref):
    np.testing.assert_array_equal(o, r)


@pytest.mark.parametrize('relu', [False, True], ids=['bn', 'bn_relu'])
def test_batch_norm_module_matches_flax(relu):
  """The module on oneDNN, with the ReLU fused or not, is Flax's BatchNorm [then ReLU]:
  the same variables, outputs, running averages, and the same in evaluation."""
  x, *_ = _bn_case(jax.random.key(5), (BATCH, 8, 8, 16), jnp.float32)
  ours = cpu_kernels.BatchNorm(train_op=onednn.batch_norm_train,
                               infer_op=onednn.batch_norm_inference, relu=relu, momentum=0.9)
  ref = flax.linen.BatchNorm(momentum=0.9)
  act = jax.nn.relu if relu else (lambda y: y)
  variables = ref.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.structure(variables) == jax.tree.structure(
      ours.init(jax.random.key(0), x, use_running_average=False))
  y, state = ours.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  y_ref, state_ref = ref.apply(variables, x, use_running_average=False,
                               mutable=['batch_stats'])
  _close(y, act(y_ref), 1e-5, 1e-5, 'y')
  jax.tree.map(lambda a, b: _close(a, b, 1e-5, 1e-6, 'stats'), state, state_ref)
  variables = {**variables, **state_ref}
  _close(ours.apply(variables, x, use_running_average=True),
         act(ref.apply(variables, x, use_running_average=True)), 1e-5, 1e-5, 'eval y')


# ------------------------------------------------------------- transformations ----

def _block(conv, bn, params, x):
  """pre-activation unit: bn-relu-conv twice, plus the identity."""
  w1, w2, s1, b1, s2, b2 = params
  h = jax.nn.relu(bn(x, s1, b1, 1e-5, None)[0])
  h = conv(h, w1, (1, 1), _pad(3))
  h = jax.nn.relu(bn(h, s2, b2, 1e-5, None)[0])
  return x + conv(h, w2, (1, 1), _pad(3))


def _block_params(key, c):
  k1, k2 = jax.random.split(key)
  w = lambda k: jax.random.normal(k, (3, 3, c, c)) / np.sqrt(9 * c)
  one, zero = jnp.ones((c,)), jnp.zeros((c,))
  return (w(k1), w(k2), one, zero, one * 1.1, zero + 0.1)


def _scanned_loss(conv, bn, remat):
  block = functools.partial(_block, conv, bn)
  if remat:
    block = jax.checkpoint(block)

  def loss(stacked, x):
    y, _ = jax.lax.scan(lambda h, p: (block(p, h), None), x, stacked)
    return jnp.mean(y ** 2)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize('remat', [False, True], ids=['scan', 'scan_checkpoint'])
def test_under_jit_scan_and_checkpoint(remat):
  c, depth = 16, 3
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[
      _block_params(k, c) for k in jax.random.split(jax.random.key(6), depth)])
  x = jax.random.normal(jax.random.key(7), (BATCH, 8, 8, c))
  (l1, g1) = _scanned_loss(onednn.conv, onednn.batch_norm_train, remat)(stacked, x)
  (l2, g2) = _scanned_loss(layers.xla_conv, cpu_kernels.batch_norm_train, remat)(stacked, x)
  _close(l1, l2, 1e-5, 1e-6, 'loss')
  jax.tree.map(lambda a, b: _close(a, b, 1e-3, 1e-5, 'grad'), g1, g2)
  if remat:  # the FFI calls are in the jaxpr (not silently replaced by the fallback)
    jaxpr = str(jax.make_jaxpr(_scanned_loss(onednn.conv, onednn.batch_norm_train, True))(
        stacked, x))
    assert 'preact_onednn_conv_bwd_weights' in jaxpr and 'preact_onednn_bn_bwd' in jaxpr


def test_vmap_and_shard_map():
  c = 8
  params = _block_params(jax.random.key(8), c)
  xs = jax.random.normal(jax.random.key(9), (2, BATCH, 8, 8, c))
  grad = lambda conv, bn: jax.grad(lambda p, x: jnp.sum(_block(conv, bn, p, x) ** 2))
  ours, ref = grad(onednn.conv, onednn.batch_norm_train), grad(layers.xla_conv,
                                                                cpu_kernels.batch_norm_train)
  expected = jax.vmap(ref, in_axes=(None, 0))(params, xs)
  got = jax.jit(jax.vmap(ours, in_axes=(None, 0)))(params, xs)
  jax.tree.map(lambda a, b: _close(a, b, 1e-4, 1e-4, 'vmap'), got, expected)
  if len(jax.devices()) >= 2:
    mesh = jax.make_mesh((2,), ('d',), devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec
    put = lambda a, s: jax.device_put(a, jax.sharding.NamedSharding(mesh, s))
    # Each device runs the kernels on its own shard (from XLA's threads, concurrently);
    # the gradients of the replicated parameters are summed over the devices.
    sharded = jax.jit(jax.shard_map(
        lambda p, x: jax.tree.map(lambda a: a[None], ours(p, x[0])), mesh=mesh,
        in_specs=(spec(), spec('d')), out_specs=spec('d')))
    args = put(params, spec()), put(xs, spec('d'))
    summed = jax.tree.map(lambda a: jnp.broadcast_to(a.sum(0), a.shape), expected)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4, 1e-4, 'shard_map'), sharded(*args), summed)
    # As preact.parallel maps the step: check_vma=False, per-replica gradients.
    unchecked = jax.jit(jax.shard_map(
        lambda p, x: jax.tree.map(lambda a: a[None], ours(p, x[0])), mesh=mesh,
        in_specs=(spec(), spec('d')), out_specs=spec('d'), check_vma=False))
    jax.tree.map(lambda a, b: _close(a, b, 1e-4, 1e-4, 'check_vma=False'), unchecked(*args),
                 expected)
    jaxpr = str(jax.make_jaxpr(sharded)(*args))
    assert 'preact_onednn_conv_bwd_weights' in jaxpr and 'preact_onednn_bn_bwd' in jaxpr


def test_thirty_training_steps_on_onednn_match_xlas_formulations(tmp_path):
  """The whole train step (model, loss, SGD) on each kernel set: the same run up to
  float32 round-off, which 30 steps amplify (at the same rate as between two XLA
  formulations of the same math: measured 0.2–5% of a leaf's norm at lr 0.01)."""
  import json
  import tensorflow_datasets as tfds
  from conftest import params_of, tiny_config
  from preact import train
  runs = {}
  for kernels in ('xla', 'onednn'):
    c = tiny_config(total_steps=30, log_every=10, **{'model.cpu_kernels': kernels,
                                                     'optimizer.lr': 0.01})
    with tfds.testing.mock_data(num_examples=64):
      train.train_and_evaluate(c, tmp_path / kernels, devices=jax.devices()[:1])
    rows = [json.loads(l) for l in (tmp_path / kernels / 'metrics.jsonl').read_text().splitlines()]
    runs[kernels] = rows, params_of(tmp_path / kernels)['params']
  (xla_rows, xla_params), (dnn_rows, dnn_params) = runs['xla'], runs['onednn']
  assert [r['step'] for r in dnn_rows] == [10, 20, 30]
  for a, b in zip(xla_rows, dnn_rows):
    assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-3)
  assert dnn_rows[-1]['test_error'] == xla_rows[-1]['test_error']
  for a, b in zip(jax.tree.leaves(xla_params), jax.tree.leaves(dnn_params)):
    assert np.linalg.norm(b - a) <= 0.1 * np.linalg.norm(a)


@pytest.mark.parametrize('unit, fused', [('full_preact', 3), ('bn_after_addition', 3),
                                         ('original', 0)])
def test_a_bfloat16_unit_adds_its_shortcut_in_its_last_conv(unit, fused, monkeypatch):
  """Where F ends in a conv and h is added as it is (full pre-activation, BN after
  addition), each unit's last conv adds h as it writes F; where BN follows that conv,
  nothing is fused. The
  fused net is as close to the float32 net as the sum done in turn is."""
  from preact import models
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))

  def value_and_grad(dtype):
    net = models.cifar_resnet(11, unit, 'bottleneck', num_classes=3, dtype=dtype,
                              scan=False, cpu_kernels='onednn')
    v = net.init(jax.random.key(1), x, train=False)

    def loss(p):
      out, _ = net.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(out.astype(jnp.float32) ** 2)

    jaxpr = str(jax.make_jaxpr(loss)(v['params']))
    l, g = jax.value_and_grad(loss)(v['params'])
    flat = np.concatenate([np.ravel(a).astype(np.float32) for a in jax.tree.leaves(g)])
    return jaxpr.count('preact_onednn_conv_fwd_add'), l, flat

  _, l32, g32 = value_and_grad(jnp.float32)  # float32 is never fused
  count, l_fused, g_fused = value_and_grad(jnp.bfloat16)
  assert count == fused  # ResNet-11 has 3 units
  monkeypatch.setattr(onednn, 'conv_add', lambda x, w, s, p, h: onednn.conv(x, w, s, p) + h)
  count, l_plain, g_plain = value_and_grad(jnp.bfloat16)
  assert count == 0
  # Measured: 0.034 (fused) and 0.035 (in turn) of the gradient's norm.
  err = lambda g: np.linalg.norm(g - g32) / np.linalg.norm(g32)
  assert err(g_fused) <= 1.25 * err(g_plain) and err(g_plain) < 0.1
  assert abs(l_fused - l32) <= 1.25 * abs(l_plain - l32) + 1e-3 * abs(l32)


def test_a_nets_flops_do_not_depend_on_its_kernels():
  """XLA cannot see into an FFI call: FLOPs are counted on XLA's own convs."""
  from preact import models
  model = models.cifar_resnet(11, 'full_preact', 'bottleneck')
  assert models.size_and_flops(model.clone(cpu_kernels='onednn'), (32, 32, 3)) == \
      models.size_and_flops(model, (32, 32, 3))
