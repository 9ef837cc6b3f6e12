"""The model zoo: unit definitions against hand-written formulas, parameter counts,
scan vs unrolled equivalence, zero-init identity behaviour, and bad input."""

import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from preact import layers, models, units

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
  return units.ResidualUnit(name, features, conv=layers.Conv,
                            norm=functools.partial(nn.BatchNorm, epsilon=EPS), **kw)


@pytest.mark.parametrize('name', list(units.UNITS))
def test_unit_matches_its_definition(name):
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  unit = _unit(name)
  v = unit.init(jax.random.key(0), x, False)
  v = {'params': _randomize(v['params'], jax.random.key(2)),
       'batch_stats': _randomize(v['batch_stats'], jax.random.key(3))}
  with jax.default_matmul_precision('highest'):
    got = unit.apply(v, x, False)
    want = _reference(name, v['params'], v['batch_stats'], x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_shortcut_in_training_drops_whole_shortcut_entries_unscaled():
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 4))
  unit = _unit('dropout_shortcut')
  v = unit.init(jax.random.key(0), x, False)
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


def test_bottleneck_projection_shares_preactivation_and_strides_first_1x1():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  unit = _unit('full_preact', features=8, branch='bottleneck', strides=2, project=True)
  v = unit.init(jax.random.key(0), x, False)
  P = _randomize(v['params'], jax.random.key(2))
  S = _randomize(v['batch_stats'], jax.random.key(3))
  b = lambda i, y: _bn(P[f'BatchNorm_{i}'], S[f'BatchNorm_{i}'], y)
  with jax.default_matmul_precision('highest'):
    got = unit.apply({'params': P, 'batch_stats': S}, x, False)
    pre = relu(b(0, x))
    F = _conv(P['Conv_2'], relu(b(2, _conv(P['Conv_1'], relu(b(1, _conv(P['Conv_0'], pre, 2)))))))
    want = _conv(P['proj'], pre, 2) + F
  assert P['Conv_0']['kernel'].shape == (1, 1, 4, 2)
  assert P['Conv_1']['kernel'].shape == (3, 3, 2, 2)
  assert P['Conv_2']['kernel'].shape == (1, 1, 2, 8)
  assert 'proj_bn' not in P  # pre-activation projections have no BN
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k,stride', [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_cpu_conv_formulations_are_the_same_math(k, stride):
  """The XLA:CPU formulations (1×1 as a matmul with a 2-D weight gradient, 3×3 with
  canonical-layout gradients) against XLA's conv and autodiff: outputs, ∂x and ∂W."""
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 5))
  plain = layers.Conv(7, (k, k), (stride, stride))
  cpu = layers.Conv(7, (k, k), (stride, stride), cpu=True)
  v = plain.init(jax.random.key(0), x)
  dy = jax.random.normal(jax.random.key(2), plain.apply(v, x).shape)

  def value_and_grads(conv):
    y, vjp = jax.vjp(lambda v, x: conv.apply(v, x), v, x)
    return y, vjp(dy)

  with jax.default_matmul_precision('highest'):
    chex_tree_close(value_and_grads(cpu), value_and_grads(plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cpu_batch_norm_is_flax_batch_norm(dtype):
  """Same variables, outputs, running averages and gradients (∂x, ∂scale, ∂bias) as
  nn.BatchNorm, in training and in evaluation."""
  x = 3 + 2 * jax.random.normal(jax.random.key(0), (4, 5, 5, 6))
  kw = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)
  flax_bn, ours = nn.BatchNorm(**kw), layers.BatchNorm(**kw)
  v = flax_bn.init(jax.random.key(1), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x, use_running_average=False)) \
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
  chex_tree_close(train(ours), train(flax_bn), **tol)
  evaluate = lambda bn: bn.apply(v, x, use_running_average=True)
  chex_tree_close(evaluate(ours), evaluate(flax_bn), **tol)


def test_cpu_conv_net_trains_the_same_network():
  plain = models.cifar_resnet(11, 'full_preact', bottleneck=True, num_classes=3)
  cpu = plain.clone(cpu_conv=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = plain.init(jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}

  def grads(model):
    def loss(p):
      out, _ = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                           mutable=['batch_stats'])
      return jnp.sum(out ** 2)
    return jax.jit(jax.value_and_grad(loss))(v['params'])

  with jax.default_matmul_precision('highest'):
    chex_tree_close(grads(cpu), grads(plain), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Parameter counts: pinned, and against an independent count.

def _independent_count(depth, unit, bottleneck, classes=10, cin=3):
  """Counts parameters layer by layer from the architecture's description (GUIDE.md §2)."""
  n = (depth - 2) // (9 if bottleneck else 6)
  widths = (64, 128, 256) if bottleneck else (16, 32, 64)
  bn = lambda c: 2 * c  # γ and β
  conv = lambda k, a, b: k * k * a * b
  preact = unit == 'full_preact'
  total = conv(3, cin, 16) + (0 if preact else bn(16))  # stem (+ BN for the original)
  c_in = 16
  for w in widths:
    for j in range(n):
      c = c_in if j == 0 else w
      if bottleneck:
        q = w // 4
        total += conv(1, c, q) + conv(3, q, q) + conv(1, q, w)
        # pre-activation: BN(c)-…-BN(q)-…-BN(q)-…; original: …-BN(q)-…-BN(q)-…-BN(w)
        total += bn(c) + 2 * bn(q) if preact else 2 * bn(q) + bn(w)
      else:
        total += conv(3, c, w) + conv(3, w, w) + (bn(c) + bn(w) if preact else 2 * bn(w))
      if c != w:  # projection shortcut; post-activation ones carry a BN
        total += conv(1, c, w) + (0 if preact else bn(w))
    c_in = w
  total += (bn(widths[-1]) if preact else 0) + widths[-1] * classes + classes
  return total


PINNED = {  # (depth, unit, bottleneck): exact parameter count
    (110, 'full_preact', False): 1_730_522,   # paper: 1.7M
    (110, 'original', False): 1_730_714,
    (164, 'full_preact', True): 1_703_258,    # paper: 1.7M
    (164, 'original', True): 1_704_154,
    (1001, 'full_preact', True): 10_327_706,  # paper: 10.2M
    (1202, 'full_preact', False): 19_423_834,  # paper: 19.4M
}


@pytest.mark.parametrize('depth,unit,bottleneck', list(PINNED))
def test_cifar_parameter_counts(depth, unit, bottleneck):
  model = models.cifar_resnet(depth, unit, bottleneck=bottleneck)
  got = models.count_params(models.init_shapes(model, (32, 32, 3))['params'])
  assert got == PINNED[depth, unit, bottleneck]
  assert got == _independent_count(depth, unit, bottleneck)
  size, _ = models.size_and_flops(model, (32, 32, 3))
  assert size == got


def test_paper_rounded_sizes():
  paper = {(110, False): 1.7e6, (164, True): 1.7e6, (1001, True): 10.2e6, (1202, False): 19.4e6}
  for (depth, bottleneck), want in paper.items():
    got = PINNED[depth, 'full_preact', bottleneck]
    assert abs(got - want) / want < 0.02, (depth, got, want)


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
  # Pre-activation trades the stem BN (64) and the projections' BNs for a final BN
  # (2048) and BNs on the projecting units' inputs: a fixed difference of 7680.
  if unit == 'full_preact':
    assert IMAGENET_PINNED[depth, 'original'] - got == 7680


def test_flops_extrapolation_is_exact():
  model = models.cifar_resnet(29, 'exclusive_gating', bottleneck=True)  # n = 3
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  unrolled = model.clone(scan=False)
  v = jax.eval_shape(functools.partial(unrolled.init, train=False), jax.random.key(0), x)
  v = {k: v[k] for k in ('params', 'batch_stats')}
  direct = jax.jit(functools.partial(unrolled.apply, train=False)).lower(v, x).cost_analysis()
  assert models.forward_flops(model, (32, 32, 3)) == pytest.approx(direct['flops'], rel=1e-6)  # float32 sums


# --------------------------------------------------------------------------------------
# Scan vs unrolled, zero-init behaviour.

@pytest.mark.parametrize('unit,bottleneck', [('full_preact', True), ('original', False),
                                             ('dropout_shortcut', False)])
def test_scanned_and_unrolled_nets_agree(unit, bottleneck):
  depth = 29 if bottleneck else 20
  scanned = models.cifar_resnet(depth, unit, bottleneck=bottleneck, num_classes=5)
  unrolled = scanned.clone(scan=False)
  x = jax.random.normal(jax.random.key(0), (4, 12, 12, 3))
  y = jnp.arange(4) % 5
  v = scanned.init(jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}
  vu = models.unscan(v)
  assert models.scan_tree(vu).keys() == v.keys()
  assert jax.tree.structure(models.scan_tree(vu)) == jax.tree.structure(v)

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
  chex_tree_close(models.unscan(gs), gu)
  chex_tree_close(models.unscan(ns), nu)


def chex_tree_close(a, b, rtol=1e-4, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, w, rtol=rtol, atol=atol)


def test_remat_changes_nothing_but_memory():
  base = models.cifar_resnet(20, 'full_preact', num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = base.init(jax.random.key(1), x, train=False)
  v = {k: v[k] for k in ('params', 'batch_stats')}

  def grads(model, v):
    def loss(p):
      out, _ = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                           mutable=['batch_stats'])
      return out.sum()
    return jax.jit(jax.grad(loss))(v['params'])

  for scan, vs in ((True, v), (False, models.unscan(v))):
    chex_tree_close(grads(base.clone(scan=scan, remat=True), vs),
                    grads(base.clone(scan=scan), vs))


def _stage_inputs(model, variables, x):
  _, state = jax.jit(functools.partial(model.apply, train=False, mutable=['intermediates']))(
      variables, x)
  return models.unit_inputs(state['intermediates'])


def test_zero_init_last_full_preact_is_identity_within_stages():
  model = models.cifar_resnet(38, 'full_preact', zero_init_last=True)  # n = 6
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  v = model.init(jax.random.key(1), x, train=False)
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
  v = unit.init(jax.random.key(1), x, False)
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
    (lambda: models.cifar_resnet(110, bottleneck=True, one_layer=True), 'exclude'),
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


def test_preact_models_json_lists_every_variant():
  out = subprocess.run([sys.executable, '-m', 'preact.cli.models', '--json',
                        '--depths=20,1001'], capture_output=True, text=True, check=True)
  rows = json.loads(out.stdout)
  got = {(r['depth'], r['branch'], r['unit']) for r in rows}
  for u in units.UNITS:
    assert (1001, 'bottleneck', u) in got and (20, 'basic', u) in got
  assert (1001, 'basic', 'original') not in got  # 999 is not a multiple of 6
  r = next(r for r in rows if (r['depth'], r['branch'], r['unit']) ==
           (1001, 'bottleneck', 'full_preact'))
  assert r['params'] == PINNED[1001, 'full_preact', True]
  assert r['flops'] > 2.5e9
