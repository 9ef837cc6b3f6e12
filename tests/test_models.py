"""The model zoo: unit definitions against hand-written formulas, parameter counts,
scan vs unrolled equivalence, zero-init identity behaviour, and bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init, tree_close
from preact import cpu_kernels, layers, models, units

relu = jax.nn.relu
EPS = 1e-5


# --------------------------------------------------------------------------------------
# Each unit variant against its definition, written out by hand.

def _conv(p, x, stride=1):
  k = p['kernel']
  pad = k.shape[0] // 2
  return jax.lax.conv_general_dilated(x, k, (stride, stride), [(pad, pad)] * 2,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision='highest')


def _bn(p, s, x):
  return (x - s['mean']) / jnp.sqrt(s['var'] + EPS) * p['scale'] + p['bias']


def _reference(name, P, S, x, stride=1):
  """The paper's Fig. 2 and Fig. 4, basic form, eval-mode BN, written without the library."""
  c0 = lambda y: _conv(P['Conv_0'], y, stride)
  c1 = lambda y: _conv(P['Conv_1'], y)
  b = lambda i, y: _bn(P[f'BatchNorm_{i}'], S[f'BatchNorm_{i}'], y)
  F_orig = b(1, c1(relu(b(0, c0(x)))))          # conv-BN-ReLU-conv-BN
  if name == 'original':
    return relu(x + F_orig)
  if name == 'bn_after_addition':
    return relu(b(1, x + c1(relu(b(0, c0(x))))))
  if name == 'relu_before_addition':
    return x + relu(F_orig)
  if name == 'relu_only_preact':
    return x + b(1, c1(relu(b(0, c0(relu(x))))))
  if name == 'full_preact':
    return x + c1(relu(b(1, c0(relu(b(0, x))))))
  if name == 'constant_scaling':
    return relu(0.5 * x + 0.5 * F_orig)
  if name in ('exclusive_gating', 'shortcut_only_gating'):
    g = jax.nn.sigmoid(_conv(P['shortcut']['gate'], x) + P['shortcut']['gate']['bias'])
    return relu((1 - g) * x + (g * F_orig if name == 'exclusive_gating' else F_orig))
  if name == 'conv_shortcut':
    return relu(_bn(P['proj_bn'], S['proj_bn'], _conv(P['proj'], x)) + F_orig)
  if name == 'dropout_shortcut':
    return relu(0.5 * x + F_orig)  # evaluation: the expected shortcut scale
  raise AssertionError(name)


def _randomize(tree, key):
  """Random values for every leaf, positive where a variance must be."""
  leaves, treedef = jax.tree.flatten_with_path(tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    v = jax.random.normal(k, leaf.shape, leaf.dtype) * 0.5
    if path[-1].key == 'var':
      v = jnp.abs(v) + 0.5
    out.append(v)
  return jax.tree.unflatten(treedef, out)


def _unit(name, features=4, **kw):
  return units.ResidualUnit(*units.get_unit(name), features, conv=layers.Conv,
                            norm=functools.partial(nn.BatchNorm, epsilon=EPS), **kw)


@pytest.mark.parametrize('name', list(units.UNITS))
def test_unit_matches_its_definition(name):
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  unit = _unit(name)
  v = init(unit, jax.random.key(0), x, False)
  v = {'params': _randomize(v['params'], jax.random.key(2)),
       'batch_stats': _randomize(v['batch_stats'], jax.random.key(3))}
  with jax.default_matmul_precision('highest'):
    got = unit.apply(v, x, False)
    want = _reference(name, v['params'], v['batch_stats'], x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_shortcut_in_training_drops_whole_shortcut_entries_unscaled():
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 4))
  unit = _unit('dropout_shortcut')
  v = init(unit, jax.random.key(0), x, False)
  P = v['params']
  out, _ = unit.apply(v, x, True, rngs={'dropout': jax.random.key(5)}, mutable=['batch_stats'])
  # Recompute F with the batch statistics this call used.
  def bn_train(p, y):
    m, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
    return (y - m) / jnp.sqrt(var + EPS) * p['scale'] + p['bias']
  with jax.default_matmul_precision('highest'):
    F = bn_train(P['BatchNorm_1'], _conv(P['Conv_1'], relu(bn_train(P['BatchNorm_0'],
                                                                     _conv(P['Conv_0'], x)))))
  kept, dropped = relu(x + F), relu(F)
  is_kept = np.isclose(out, kept, atol=1e-4)
  is_dropped = np.isclose(out, dropped, atol=1e-4)
  assert np.all(is_kept | is_dropped)
  decided = is_kept ^ is_dropped  # entries where the two outcomes differ
  frac = is_kept[decided].mean()
  assert 0.45 < frac < 0.55, frac


def _random_first_unit(name, **kw):
  """A stage's first unit, 4→8 channels with stride 2, random parameters and BN
  statistics: (x, its eval-mode output, params, BN(i, y) with those statistics)."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  unit = _unit(name, features=8, strides=2, first=True, **kw)
  v = init(unit, jax.random.key(0), x, False)
  P = _randomize(v['params'], jax.random.key(2))
  S = _randomize(v['batch_stats'], jax.random.key(3))
  with jax.default_matmul_precision('highest'):
    got = unit.apply({'params': P, 'batch_stats': S}, x, False)
  return x, got, P, lambda i, y: _bn(P[f'BatchNorm_{i}'], S[f'BatchNorm_{i}'], y)


def test_bottleneck_projection_shares_preactivation_and_strides_first_1x1():
  x, got, P, b = _random_first_unit('full_preact', block='bottleneck')
  with jax.default_matmul_precision('highest'):
    pre = relu(b(0, x))
    F = _conv(P['Conv_2'], relu(b(2, _conv(P['Conv_1'], relu(b(1, _conv(P['Conv_0'], pre, 2)))))))
    want = _conv(P['proj'], pre, 2) + F
  assert P['Conv_0']['kernel'].shape == (1, 1, 4, 2)
  assert P['Conv_1']['kernel'].shape == (3, 3, 2, 2)
  assert P['Conv_2']['kernel'].shape == (1, 1, 2, 8)
  assert 'proj_bn' not in P  # pre-activation projections have no BN
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _option_a(x, features):
  """Subsample by 2, then zero channels up to ``features`` (He et al. CVPR 2016, option A)."""
  x = x[:, ::2, ::2, :]
  return jnp.concatenate([x, jnp.zeros(x.shape[:3] + (features - x.shape[-1],))], -1)


@pytest.mark.parametrize('name', ['full_preact', 'original'])
def test_zero_pad_shortcut_is_option_a_on_the_shared_preactivation(name):
  """A basic unit that changes shape (4→8, stride 2) with option A: no parameters on
  the shortcut, which reads the unit's pre-activation where it has one."""
  x, got, P, b = _random_first_unit(name, shortcut='zero_pad')
  with jax.default_matmul_precision('highest'):
    if name == 'full_preact':
      pre = relu(b(0, x))
      want = _option_a(pre, 8) + _conv(P['Conv_1'], relu(b(1, _conv(P['Conv_0'], pre, 2))))
    else:
      want = relu(_option_a(x, 8) + b(1, _conv(P['Conv_1'], relu(b(0, _conv(P['Conv_0'], x, 2))))))
  assert set(P) == {'Conv_0', 'Conv_1', 'BatchNorm_0', 'BatchNorm_1'}  # no 'proj'
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('unit', ['full_preact', 'relu_only_preact', 'original'])
@pytest.mark.parametrize('form', ['basic', 'one_layer', 'bottleneck'])
def test_first_unit_splits_after_the_activation_of_conv1(unit, form):
  """Paper appendix: "for the first Residual Unit (that follows a stand-alone
  convolutional layer, conv1), we adopt the first activation right after conv1 and
  before splitting into two paths". With F ≡ 0 (zero_init_last) and the identity
  after the addition, stage 1 passes its input through: BN-ReLU(conv1(x)), never the raw
  conv1 output."""
  depth = {'basic': 8, 'one_layer': 5, 'bottleneck': 11}[form]
  model = models.cifar_resnet(depth, unit, form, zero_init_last=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = init(model, jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}
  P, S = v['params'], v['batch_stats']
  with jax.default_matmul_precision('highest'):
    act = relu(_bn(P['stem_bn'], S['stem_bn'], _conv(P['stem'], x)))
  xs = _stage_inputs(model, v, x)
  np.testing.assert_allclose(xs[0][1], act, rtol=1e-5, atol=1e-5)  # x_0: activated conv1
  if form != 'bottleneck':  # stage 1 changes no shape: x_1 = x_0 + F(x_0) = x_0
    np.testing.assert_array_equal(xs[1][1], xs[0][1])
  names = set(P['stage1_unit1'])
  assert ('proj' in names) == (form == 'bottleneck')
  if unit == 'full_preact' and form != 'bottleneck':
    # Its own first BN-ReLU is the stem's: only the BN between two convs remains.
    want = {'basic': {'Conv_0', 'Conv_1', 'BatchNorm_0'}, 'one_layer': {'Conv_0'}}[form]
    assert names == want


@pytest.mark.parametrize('k,stride', [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_cpu_kernel_formulations_are_the_same_math(k, stride):
  """The XLA:CPU formulations (1×1 as a matmul with a 2-D weight gradient, 3×3 with
  canonical-layout gradients) against XLA's conv and autodiff: outputs, ∂x and ∂W."""
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 5))
  plain = layers.Conv(7, (k, k), (stride, stride))
  cpu = layers.Conv(7, (k, k), (stride, stride), op=cpu_kernels.conv)
  v = init(plain, jax.random.key(0), x)
  dy = jax.random.normal(jax.random.key(2), plain.apply(v, x).shape)

  def value_and_grads(conv):
    y, vjp = jax.vjp(lambda v, x: conv.apply(v, x), v, x)
    return y, vjp(dy)

  with jax.default_matmul_precision('highest'):
    tree_close(value_and_grads(cpu), value_and_grads(plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cpu_batch_norm_is_flax_batch_norm(dtype):
  """Same variables, outputs, running averages and gradients (∂x, ∂scale, ∂bias) as
  nn.BatchNorm, in training and in evaluation."""
  x = 3 + 2 * jax.random.normal(jax.random.key(0), (4, 5, 5, 6))
  kw = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)
  flax_bn, ours = nn.BatchNorm(**kw), cpu_kernels.BatchNorm(**kw)
  v = init(flax_bn, jax.random.key(1), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, init(ours, jax.random.key(1), x, use_running_average=False)) \
      == jax.tree.map(jnp.shape, v)
  v = {'params': _randomize(v['params'], jax.random.key(2)), 'batch_stats': v['batch_stats']}
  dy = jax.random.normal(jax.random.key(3), x.shape)

  def train(bn):
    def f(params, x):
      y, new = bn.apply({'params': params, 'batch_stats': v['batch_stats']}, x,
                        use_running_average=False, mutable=['batch_stats'])
      return y.astype(jnp.float32), new
    y, vjp, new = jax.vjp(f, v['params'], x, has_aux=True)
    return y, new, vjp(dy)

  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  tree_close(train(ours), train(flax_bn), **tol)
  evaluate = lambda bn: bn.apply(v, x, use_running_average=True)
  tree_close(evaluate(ours), evaluate(flax_bn), **tol)


def test_cpu_kernels_auto_is_onednn_where_built_else_xla(monkeypatch):
  from preact import onednn
  monkeypatch.setattr(onednn, '_lib', False)
  monkeypatch.setattr(onednn, '_why', '_onednn_ffi.so not built')
  assert models.cpu_kernel_set('auto') == 'xla'
  with pytest.raises(ValueError, match=r"cpu_kernels='onednn' but _onednn_ffi.so not built; "
                                       r"run `python -m preact.onednn.build`"):
    models.cpu_kernel_set('onednn')
  monkeypatch.setattr(onednn, '_lib', object())
  assert models.cpu_kernel_set('auto') == 'onednn'
  assert models.cpu_kernel_set('off') == 'off'


def test_cpu_kernel_net_trains_the_same_network():
  plain = models.cifar_resnet(11, 'full_preact', 'bottleneck', num_classes=3)
  cpu = plain.clone(cpu_kernels='xla')
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = init(plain, jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}

  def grads(model):
    def loss(p):
      out, _ = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                           mutable=['batch_stats'])
      return jnp.sum(out ** 2)
    return jax.jit(jax.value_and_grad(loss))(v['params'])

  with jax.default_matmul_precision('highest'):
    tree_close(grads(cpu), grads(plain), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Parameter counts: the code against hand counts and the paper's Table 4.

# Hand counts, layer by layer, from the authors' architecture (resnet-pre-act.lua; He et
# al. CVPR 2016 for the basic nets' option-A shortcuts). Convs have no bias; a BN has γ, β.
C3 = lambda a, b: 3 * 3 * a * b
C1 = lambda a, b: a * b
BN = lambda c: 2 * c
STEM = C3(3, 16) + BN(16)  # conv1 and its BN-ReLU, in every net


def _basic(n, preact, projection=False):
  """3 stages of n two-3×3 units, widths 16/32/64; the first unit of stages 2–3 changes
  shape (16→32, 32→64) through option A (no parameters) or a 1×1 projection."""
  total = STEM
  for c_in, w in ((16, 16), (16, 32), (32, 64)):
    convs = C3(c_in, w) + C3(w, w) + (n - 1) * 2 * C3(w, w)
    if preact:  # BN-ReLU before each conv; stage 1's first unit reads the stem's
      bns = (BN(c_in) if c_in != w else 0) + BN(w) + (n - 1) * 2 * BN(w)
    else:       # conv-BN twice per unit, and a BN on a post-activation projection
      bns = n * 2 * BN(w) + (BN(w) if projection and c_in != w else 0)
    total += convs + bns + (C1(c_in, w) if projection and c_in != w else 0)
  return total + (BN(64) if preact else 0) + 64 * 10 + 10


def _bottleneck(n, preact):
  """3 stages of n units 1×1 (w/4) – 3×3 (w/4) – 1×1 (w), outputs 64/128/256; every
  stage's first unit projects with a 1×1 conv (16→64, 64→128, 128→256)."""
  total = STEM
  for c_in, w in ((16, 64), (64, 128), (128, 256)):
    q = w // 4
    unit = lambda c: C1(c, q) + C3(q, q) + C1(q, w)
    total += unit(c_in) + C1(c_in, w) + (n - 1) * unit(w)
    if preact:  # BN(c) before the first conv (stage 1's first unit: the stem's), 2 BN(q)
      total += (BN(c_in) if c_in != 16 else 0) + 2 * BN(q) + (n - 1) * (BN(w) + 2 * BN(q))
    else:       # 2 BN(q), BN(w) at the branch's end, BN(w) on the projection
      total += n * (2 * BN(q) + BN(w)) + BN(w)
  return total + (BN(256) if preact else 0) + 256 * 10 + 10


PINNED = {  # (depth, unit, block, shortcut): (hand count, the literal it comes to)
    (110, 'full_preact', 'basic', 'auto'): (_basic(18, True), 1_727_962),       # paper: 1.7M
    (110, 'original', 'basic', 'auto'): (_basic(18, False), 1_727_962),
    (110, 'full_preact', 'basic', 'projection'): (_basic(18, True, True), 1_730_522),
    (110, 'original', 'basic', 'projection'): (_basic(18, False, True), 1_730_714),
    (164, 'full_preact', 'bottleneck', 'auto'): (_bottleneck(18, True), 1_703_258),   # paper: 1.7M
    (164, 'original', 'bottleneck', 'auto'): (_bottleneck(18, False), 1_704_154),
    (1001, 'full_preact', 'bottleneck', 'auto'): (_bottleneck(111, True), 10_327_706),  # paper: 10.2M
    (1202, 'full_preact', 'basic', 'auto'): (_basic(200, True), 19_421_274),    # paper: 19.4M
}
PAPER_MILLIONS = {110: 1.7, 164: 1.7, 1001: 10.2, 1202: 19.4}  # paper Table 4


@pytest.mark.parametrize('depth,unit,block,shortcut', list(PINNED))
def test_cifar_parameter_counts(depth, unit, block, shortcut):
  hand, literal = PINNED[depth, unit, block, shortcut]
  assert hand == literal
  model = models.cifar_resnet(depth, unit, block, shortcut=shortcut)
  got = models.count_params(models.init_shapes(model, (32, 32, 3))['params'])
  assert got == hand
  if shortcut == 'auto':  # the paper rounds (1.73M is "1.7M"); ResNet-1001 is 10.33M, "10.2M"
    assert abs(got / 1e6 - PAPER_MILLIONS[depth]) / PAPER_MILLIONS[depth] < 0.02
  size, _ = models.size_and_flops(model, (32, 32, 3))
  assert size == got


def test_one_layer_net_count():
  """Table 3's 1-layer skip ResNet-110: 36 units a stage of one 3×3 conv each, option A."""
  n = 36
  convs = sum(C3(a, w) + (n - 1) * C3(w, w) for a, w in ((16, 16), (16, 32), (32, 64)))
  bns = (n - 1) * BN(16) + (BN(16) + (n - 1) * BN(32)) + (BN(32) + (n - 1) * BN(64))
  model = models.cifar_resnet(110, 'full_preact', 'one_layer')
  got = models.count_params(models.init_shapes(model, (32, 32, 3))['params'])
  assert got == STEM + convs + bns + BN(64) + 64 * 10 + 10


IMAGENET_PINNED = {  # torchvision's resnet50/152 have exactly the 'original' counts
    (50, 'original'): 25_557_032, (50, 'full_preact'): 25_549_352,
    (152, 'original'): 60_192_808, (152, 'full_preact'): 60_185_128,
    (200, 'original'): 64_673_832, (200, 'full_preact'): 64_666_152,
}


@pytest.mark.parametrize('depth,unit', list(IMAGENET_PINNED))
def test_imagenet_parameter_counts(depth, unit):
  model = models.imagenet_resnet(depth, unit)
  got = models.count_params(models.init_shapes(model, (224, 224, 3))['params'])
  assert got == IMAGENET_PINNED[depth, unit]
  # The original unit ends its branch and its projection in BN(w); the pre-activation
  # unit starts with BN(c_in), and the net ends with BN(2048): a fixed difference of 7680.
  if unit == 'full_preact':
    assert IMAGENET_PINNED[depth, 'original'] - got == 7680


def test_flops_extrapolation_is_exact():
  model = models.cifar_resnet(29, 'exclusive_gating', 'bottleneck')  # n = 3
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  unrolled = model.clone(scan=False)
  v = jax.eval_shape(functools.partial(unrolled.init, train=False), jax.random.key(0), x)
  v = {k: v[k] for k in ('params', 'batch_stats')}
  direct = jax.jit(functools.partial(unrolled.apply, train=False)).lower(v, x).cost_analysis()
  flops = models.size_and_flops(model, (32, 32, 3))[1]
  assert flops == pytest.approx(direct['flops'], rel=1e-6)  # float32 sums


# --------------------------------------------------------------------------------------
# Scan vs unrolled, zero-init behaviour.

@pytest.mark.parametrize('unit,block', [('full_preact', 'bottleneck'), ('original', 'basic'),
                                        ('dropout_shortcut', 'basic')])
@pytest.mark.slow
def test_scanned_and_unrolled_nets_agree(unit, block):
  depth = 29 if block == 'bottleneck' else 20
  scanned = models.cifar_resnet(depth, unit, block, num_classes=5)
  unrolled = scanned.clone(scan=False)
  x = jax.random.normal(jax.random.key(0), (4, 12, 12, 3))
  y = jnp.arange(4) % 5
  v = init(scanned, jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}
  vu = models.unscan(v)

  def loss(model, params, stats):
    logits, new = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                              mutable=['batch_stats'], rngs={'dropout': jax.random.key(3)})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, new)

  step = lambda m: jax.jit(jax.value_and_grad(functools.partial(loss, m), has_aux=True))
  (ls, (ys, ns)), gs = step(scanned)(v['params'], v['batch_stats'])
  (lu, (yu, nu)), gu = step(unrolled)(vu['params'], vu['batch_stats'])
  if unit == 'dropout_shortcut':
    # The rng streams differ between layouts; compare the deterministic eval path.
    es = jax.jit(functools.partial(scanned.apply, train=False))(v, x)
    eu = jax.jit(functools.partial(unrolled.apply, train=False))(vu, x)
    np.testing.assert_allclose(es, eu, rtol=1e-5, atol=1e-6)
    return
  np.testing.assert_allclose(ys, yu, rtol=1e-5, atol=1e-6)
  tree_close(models.unscan(gs), gu)
  tree_close(models.unscan(ns), nu)


@pytest.mark.slow
def test_remat_changes_nothing_but_memory():
  base = models.cifar_resnet(20, 'full_preact', num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = init(base, jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}

  def grads(model, v):
    def loss(p):
      out, _ = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                           mutable=['batch_stats'])
      return out.sum()
    return jax.jit(jax.grad(loss))(v['params'])

  # The recomputed forward is compiled apart, so float32 sums may round differently:
  # gradients of order 1 cancel through train-mode BN to 1e-4, where that is 1e-6.
  for scan, vs in ((True, v), (False, models.unscan(v))):
    tree_close(grads(base.clone(scan=scan, remat=True), vs),
               grads(base.clone(scan=scan), vs), atol=1e-5)


def test_a_float32_carry_changes_no_bit_of_a_bfloat16_step():
  """FloatCarry: x_l is a bfloat16 value whether it travels between scanned units in
  bfloat16 or float32, so logits, gradients and batch statistics are bit for bit the
  same; only the stacks of unit inputs that remat keeps are float32 (faster on XLA:CPU)."""
  base = models.cifar_resnet(14, 'full_preact', num_classes=3, dtype=jnp.bfloat16,
                             cpu_kernels='xla', remat=True)  # two units a stage: a scan
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = init(base, jax.random.key(1), x, train=False)

  def step(model):
    def loss(p):
      out, new = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                             mutable=['batch_stats'])
      return out.sum(), (out, new)
    return jax.jit(jax.grad(loss, has_aux=True))(v['params'])

  def stacked_dtypes(model):  # of the scans' per-unit outputs in the forward pass
    forward = lambda p: model.apply({'params': p, 'batch_stats': v['batch_stats']}, x,
                                    train=True, mutable=['batch_stats'])[0]
    jaxpr = jax.make_jaxpr(lambda p: jax.vjp(forward, p))(v['params'])
    return {str(a.aval.dtype) for e in jaxpr.eqns for a in e.outvars
            if e.primitive.name == 'scan' and a.aval.ndim == 5}

  on, off = base.clone(float_carry=True), base.clone(float_carry=False)
  for a, b in zip(jax.tree.leaves(step(on)), jax.tree.leaves(step(off))):
    np.testing.assert_array_equal(a, b)
  assert stacked_dtypes(on) == {'float32'} and stacked_dtypes(off) == {'bfloat16'}
  assert stacked_dtypes(base) == {'float32'}  # the default with CPU kernels
  assert stacked_dtypes(base.clone(cpu_kernels='off')) == {'bfloat16'}
  assert stacked_dtypes(base.clone(remat=False)) == {'bfloat16', 'bool'}


def _stage_inputs(model, variables, x):
  _, state = jax.jit(functools.partial(model.apply, train=False, mutable=['intermediates']))(
      variables, x)
  return models.unit_inputs(state['intermediates'])


def test_zero_init_last_full_preact_is_identity_within_stages():
  model = models.cifar_resnet(38, 'full_preact', zero_init_last=True)  # n = 6
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  v = init(model, jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}
  xs = _stage_inputs(model, v, x)
  assert len(xs) == 18
  firsts = {s: i for i, (s, _) in reversed(list(enumerate(xs)))}
  for i, ((s0, a), (s1, b)) in enumerate(zip(xs, xs[1:])):
    if s0 == s1 and i != firsts[s0]:  # past a stage's first unit: x_{l+1} = x_l exactly
      np.testing.assert_array_equal(a, b)
  # Stage 1 does not project (16→16): x_1 is the stem output all the way through.
  np.testing.assert_array_equal(xs[0][1], xs[5][1])


@pytest.mark.parametrize('name', list(units.PLACEMENTS))
def test_zero_init_last_unit_is_identity_iff_nothing_follows_the_addition(name):
  """With F ≡ 0 a unit computes f(x): the identity when f is, else e.g. ReLU(x)."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))  # signed, as x_l may be
  unit = _unit(name, zero_init_last=True)
  v = init(unit, jax.random.key(1), x, False)
  out = unit.apply(v, x, False)
  if units.PLACEMENTS[name].after_add:
    assert not np.allclose(out, x, atol=1e-3)
    if name == 'original':
      np.testing.assert_array_equal(out, jax.nn.relu(x))
  else:
    np.testing.assert_array_equal(out, x)


# --------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize('call,match', [
    (lambda: models.cifar_resnet(100), r'6n\+2'),
    (lambda: models.cifar_resnet(110, block='wide'), "unknown block 'wide'"),
    (lambda: models.imagenet_resnet(50, block='basic'), 'built of bottleneck units'),
    (lambda: models.cifar_resnet(1001), r'fits: bottleneck'),
    (lambda: models.cifar_resnet(164, 'preact'), 'valid units: original'),
    (lambda: models.cifar_resnet(20, 'constant_scaling', unit_args={'lam': 1}),
     'valid: scale, branch_scale'),
    (lambda: models.cifar_resnet(20, 'dropout_shortcut', unit_args={'rate': 1.5}), r'\[0, 1\)'),
    (lambda: models.imagenet_resnet(77), 'valid depths: 18, 34'),
])
def test_bad_model_settings_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
