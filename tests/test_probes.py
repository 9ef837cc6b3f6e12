"""Gradient probes against the paper's analytic results (Eq. 5 and Eq. 7), against
finite differences for every unit variant, and the probes a run takes of itself while it
trains."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import init, tiny_config
from preact import checkpoint, models, plots, probes, train, units

X = jax.random.normal(jax.random.key(0), (6, 12, 12, 3))
Y = jnp.arange(6) % 10


def _net(unit, depth=38, **kw):  # 38 = 6·6+2: six basic units per stage
  model = models.cifar_resnet(depth, unit, **kw)
  variables = jax.jit(functools.partial(model.init, train=False))(models.init_key(1), X[:1])
  return model, {k: variables[k] for k in ('params', 'batch_stats')}


def _raw(model, variables, train=True):
  """Raw ∂L/∂x_l and x_l per unit, in order, through the probes' own loss."""
  perts = probes.zero_perturbations(model, X)
  (_, inter), grads = jax.jit(jax.value_and_grad(
      functools.partial(probes.probe_loss, model, variables), has_aux=True),
      static_argnums=(3,))(perts, X, Y, train, jax.random.key(0))
  return models.unit_inputs(grads), models.unit_inputs(inter)


def _non_first(stages):
  """Indices of units that are not their stage's first."""
  return [i for i in range(1, len(stages)) if stages[i] == stages[i - 1]]


def test_full_preact_gradient_is_the_same_vector_across_a_stage():
  """Eq. 5 with F ≡ 0: ∂L/∂x_l = ∂L/∂x_L for every l within a stage."""
  model, v = _net('full_preact', zero_init_last=True)
  grads, _ = _raw(model, v)
  stages = [s for s, _ in grads]
  for i in _non_first(stages):
    if i + 1 < len(grads) and stages[i + 1] == stages[i]:
      np.testing.assert_array_equal(grads[i][1], grads[i + 1][1])
  r = probes.gradient_probe(model, v, X, Y, train=True)
  for i in _non_first(list(r.stage)):  # bitwise-equal gradients: exactly 1, in float64
    assert r.ratio[i] == 1.0 and r.cosine[i] == 1.0
  # Stage 1 changes no shape (16 → 16), so its first unit is on the identity path too.
  assert r.ratio[0] == 1.0 and r.cosine[0] == 1.0


@pytest.mark.parametrize('scale', [0.5, 0.8])
def test_constant_scaling_multiplies_the_gradient_by_lambda_per_unit(scale):
  """Eq. 7: with F ≡ 0, x_{l+1} = ReLU(λ x_l), so ∂L/∂x_l = λ^(L−l) ∂L/∂x_L (the
  ReLU masks coincide because λ > 0 keeps the sign pattern of x ≥ 0)."""
  model, v = _net('constant_scaling', zero_init_last=True, unit_args={'scale': scale})
  r = probes.gradient_probe(model, v, X, Y, train=True)
  for s in range(3):
    idx = np.flatnonzero(r.stage == s)
    last = idx[-1]
    for i in idx:
      if s > 0 and i == idx[0]:
        continue  # the projecting unit reads another shape
      np.testing.assert_allclose(r.ratio[i], scale ** (last - i), rtol=2e-5)
      assert r.cosine[i] == pytest.approx(1.0, abs=1e-5)
  assert r.grad_norm[0] / r.grad_norm[5] == pytest.approx(scale ** 5, rel=1e-4)


@pytest.mark.slow
def test_original_unit_gradient_is_masked_by_the_after_addition_relus():
  """F made a constant: the last BN's scale 0 and a random β per channel, so the branch
  adds β_l whatever its input and x_{l+1} = ReLU(x_l + β_l). Only the after-addition
  ReLUs act on the gradient: ∂L/∂x_l = ∂L/∂x_L · Π_{j=l}^{L−1} 1[x_{j+1} > 0]."""
  model, v = _net('original', zero_init_last=True)
  keys = iter(jax.random.split(jax.random.key(7), 64))

  def beta(path, leaf):  # the branch's last BN (after its second conv) in every unit
    names = [getattr(p, 'key', None) for p in path]
    if names[-2:] == ['BatchNorm_1', 'bias'] and names[0].startswith('stage'):
      return jax.random.normal(next(keys), leaf.shape)
    return leaf

  v = {**v, 'params': jax.tree_util.tree_map_with_path(beta, v['params'])}
  grads, xs = _raw(model, v)
  stages = [s for s, _ in grads]
  r = probes.gradient_probe(model, v, X, Y, train=True)
  bitten = 0
  for s in range(3):
    idx = [i for i, st in enumerate(stages) if st == s]
    last = idx[-1]
    for i in idx[1:] if s else idx:
      mask = np.ones_like(xs[i][1])
      for j in range(i, last):
        mask = mask * (np.asarray(xs[j + 1][1]) > 0)
      g_last = np.asarray(grads[last][1])
      np.testing.assert_array_equal(grads[i][1], mask * g_last)
      want = np.sqrt(np.sum(np.square(mask * g_last), dtype=np.float64)
                     / np.sum(np.square(g_last), dtype=np.float64))
      np.testing.assert_allclose(r.ratio[i], want, rtol=1e-5)
      bitten += want < 0.99
  assert bitten >= 10  # the masks cut the gradient: the ratio is not 1


@pytest.mark.slow
@pytest.mark.parametrize('unit', list(units.UNITS))
def test_probe_agrees_with_finite_differences_in_float64(unit):
  with jax.enable_x64(True):
    model = models.cifar_resnet(20, unit, dtype=jnp.float64)  # three units per stage
    x = X.astype(jnp.float64)
    variables = init(model, models.init_key(2), x[:1], train=False)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                             {k: variables[k] for k in ('params', 'batch_stats')})
    perts = probes.zero_perturbations(model, x)
    rng = jax.random.key(4)
    loss = jax.jit(lambda p: probes.probe_loss(model, variables, p, x, Y, True, rng)[0])
    grads = jax.grad(loss)(perts)
    # Directional derivatives at a scanned unit (stage 2, third unit) and a first unit.
    for name, index in (('stage2_rest', 1), ('stage3_unit1', None)):
      direction = jax.random.normal(jax.random.key(7), perts[name]['x'].shape, jnp.float64)
      if index is not None:  # only that unit's slice of the stacked perturbation
        direction = direction * (jnp.arange(direction.shape[0]) == index).reshape(
            -1, *[1] * (direction.ndim - 1))
      # Thousands of ReLUs see the bump (and, in train mode, every BN statistic moves):
      # a small step keeps the difference off their kinks (1e-6 lands on one in
      # exclusive gating), a larger one off float64's round-off (at 1e-8 it reaches 2e-5
      # of the derivative); at 1e-7 every unit agrees within 2e-6.
      eps = 1e-7
      bump = lambda e: jax.tree_util.tree_map_with_path(
          lambda path, a: a + e * direction if path[0].key == name else a, perts)
      fd = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
      exact = jnp.sum(grads[name]['x'] * direction)
      np.testing.assert_allclose(fd, exact, rtol=2e-5, atol=1e-10)


def test_probe_is_the_same_scanned_and_unrolled():
  model, v = _net('relu_only_preact')
  a = probes.gradient_probe(model, v, X, Y, train=True)
  b = probes.gradient_probe(model.clone(scan=False), models.unscan(v), X, Y, train=True)
  for field in ('grad_norm', 'ratio', 'act_norm'):
    np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-4)
  assert len(a) == 18 and a.to_json()['units'][0]['index'] == 0


def test_identity_test_is_zero_exactly_for_identity_paths():
  for unit, identity in (('full_preact', True), ('relu_before_addition', True),
                         ('bn_after_addition', False), ('constant_scaling', False)):
    model, v = _net(unit, zero_init_last=True)
    change = probes.stage_changes(model, models.model_state(v), X)
    assert change.shape == (3,)
    assert np.all(change == 0) == identity, (unit, change)


# --------------------------------------------------------------------------------------
# Over training: the probes a run takes of itself.


def _probed_run(workdir, **overrides):
  c = tiny_config(**{'probe_every': 1, 'probe_batch': 8, 'checkpoint_every': 1,
                     'keep_checkpoints': 10, **overrides})
  with tfds.testing.mock_data(num_examples=48):
    train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
    return [json.loads(l) for l in (workdir / 'probes.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_the_probe_in_training_equals_the_probe_of_that_steps_checkpoint(tmp_path):
  rows = _probed_run(tmp_path)
  assert [r['step'] for r in rows] == [0, 1, 2, 3]
  assert len(rows[0]['units']) == 3 and set(rows[0]['units'][0]) == {
      'index', 'stage', 'grad_norm', 'ratio', 'cosine', 'act_norm'}
  with tfds.testing.mock_data(num_examples=48):
    offline = probes.probe_checkpoints(tmp_path)
  assert [r['step'] for r in offline] == [1, 2, 3]
  assert offline == rows[1:]  # bit for bit: the same numbers in JSON
  assert rows[1] != rows[3]  # it trained in between


@pytest.mark.slow
def test_eq5_a_zeroed_full_preact_net_at_lr_0_keeps_ratio_1_at_every_probe(tmp_path):
  """Eq. 5: x_L = x_l + Σ F = x_l while every branch is zero, so ∂L/∂x_l = ∂L/∂x_L from
  each stage's second unit on, at every probe of a run whose lr is 0 (its warm-up)."""
  rows = _probed_run(tmp_path, total_steps=5, checkpoint_every=1000, **{
      'model.depth': 20, 'model.zero_init_last': True, 'optimizer.schedule': 'step',
      'optimizer.warmup_steps': 4, 'optimizer.warmup_lr': 0.0})
  held = [r for r in rows if r['step'] <= 4]
  assert [r['step'] for r in held] == [0, 1, 2, 3, 4]
  middle = lambda r: [u for u in r['units'] if u['index'] % 3 == 1]  # 3 units a stage
  for r in held:
    assert [u['ratio'] for u in middle(r)] == [1.0] * 3
    assert [u['cosine'] for u in middle(r)] == [1.0] * 3
  assert held[0]['units'] == held[4]['units']  # nothing moved
  # A step at lr 0.1 grows the branches, and the ratio leaves 1.
  assert all(u['ratio'] != 1.0 for u in middle(rows[-1]))


@pytest.mark.slow
def test_probe_rows_are_written_once_across_a_resume(tmp_path):
  whole = _probed_run(tmp_path / 'whole', total_steps=4, **{'optimizer.schedule': 'step'})
  _probed_run(tmp_path / 'cut', total_steps=2, **{'optimizer.schedule': 'step'})
  # A kill after the probe of step 2 was written but before its checkpoint was: the
  # run resumes from step 1 and must not log step 2 twice.
  (tmp_path / 'cut' / 'outcome.json').unlink()
  ck = checkpoint.Checkpoints(tmp_path / 'cut')
  ck.manager.delete(2)
  ck.close()
  resumed = _probed_run(tmp_path / 'cut', total_steps=4, **{'optimizer.schedule': 'step'})
  assert resumed == whole


@pytest.mark.slow
def test_heatmaps_over_training_from_probes_jsonl(tmp_path):
  rows = _probed_run(tmp_path / 'run')
  names = plots.over_training(rows, 'ResNet-8', tmp_path)
  assert names == ['probe_ratio.png', 'probe_act_norm.png', 'probe_profiles.png']
  for name in names:
    assert (tmp_path / name).read_bytes()[:4] == b'\x89PNG'
  png, width, height = plots.profile_png(rows[0])
  assert png[:4] == b'\x89PNG' and (width, height) == (900, 320)  # 9 × 3.2 in at 100 dpi
