"""Training library: the recipe (schedule, SGD as Torch does it), pmap vs shard_map,
cross-replica BN vs one device, checkpoints across device counts, exactly-once eval,
divergence as an outcome, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from preact import config as config_lib, models, step as step_lib, train
from preact.errors import UserError

from conftest import params_of, tiny_config


# --------------------------------------------------------------------------------------
# The recipe.

def test_step_schedule_with_warmup_matches_the_paper():
  o = config_lib.base().optimizer
  assert (o.warmup_steps, o.warmup_lr) == (400, 0.01)  # the paper's, as the default
  s = step_lib.make_schedule(o, 64_000)
  assert float(s(0)) == pytest.approx(0.01) and float(s(399)) == pytest.approx(0.01)
  assert float(s(400)) == pytest.approx(0.1) and float(s(31_999)) == pytest.approx(0.1)
  assert float(s(32_000)) == pytest.approx(0.01) and float(s(47_999)) == pytest.approx(0.01)
  assert float(s(48_000)) == pytest.approx(0.001) and float(s(63_999)) == pytest.approx(0.001)
  o.warmup_steps = 0
  s = step_lib.make_schedule(o, 64_000)
  assert float(s(0)) == pytest.approx(0.1) and float(s(32_000)) == pytest.approx(0.01)


@pytest.mark.parametrize('decay,nesterov', [('all', True), ('weights', False)])
def test_sgd_matches_torch_sgd_with_coupled_weight_decay(decay, nesterov):
  o = config_lib.base().optimizer
  o.decay, o.nesterov, o.schedule, o.warmup_steps = decay, nesterov, 'step', 0
  tx = step_lib.make_optimizer(o, 100)
  params = {'conv': {'kernel': jnp.array([1.0, -2.0])}, 'bn': {'scale': jnp.array([0.5])}}
  grads = [{'conv': {'kernel': jnp.array([0.3, 0.1])}, 'bn': {'scale': jnp.array([-0.2])}},
           {'conv': {'kernel': jnp.array([-0.1, 0.4])}, 'bn': {'scale': jnp.array([0.05])}}]
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  # Torch: d = g + wd·θ; v = μ·v + d; step = d + μ·v (Nesterov) or v; θ -= lr·step.
  want = jax.tree.map(np.asarray, params)
  v = jax.tree.map(np.zeros_like, want)
  for g in grads:
    for group, key in (('conv', 'kernel'), ('bn', 'scale')):
      wd = 1e-4 if (decay == 'all' or key == 'kernel') else 0.0
      d = np.asarray(g[group][key]) + wd * want[group][key]
      v[group][key] = 0.9 * v[group][key] + d
      step = d + 0.9 * v[group][key] if nesterov else v[group][key]
      want[group][key] = want[group][key] - 0.1 * step
  for group, key in (('conv', 'kernel'), ('bn', 'scale')):
    np.testing.assert_allclose(p[group][key], want[group][key], rtol=1e-6)


# --------------------------------------------------------------------------------------
# Parallelism.

def _train(config, workdir, devices=1):
  """A run on mocked data over the first ``devices`` devices: one, unless a test is about
  parallelism (each of 8 fake devices on 2 cores costs a run several times the time)."""
  with tfds.testing.mock_data(num_examples=48):
    return train.train_and_evaluate(config, workdir, devices=jax.devices()[:devices])


@pytest.mark.slow
def test_pmap_and_shard_map_agree_after_three_steps(tmp_path):
  assert jax.device_count() == 8
  out = {}
  for kind in ('pmap', 'shard_map'):
    _train(tiny_config(parallelism=kind), tmp_path / kind, devices=8)
    out[kind] = params_of(tmp_path / kind)
    rows = [json.loads(l) for l in (tmp_path / kind / 'metrics.jsonl').read_text().splitlines()]
    out[kind + '_loss'] = rows[-1]['train_loss']
  assert int(out['pmap']['step']) == 3
  assert out['pmap_loss'] == pytest.approx(out['shard_map_loss'], rel=1e-6)
  for a, b in zip(jax.tree.leaves(out['pmap']), jax.tree.leaves(out['shard_map'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cross_replica_bn_on_8_devices_equals_one_device(tmp_path):
  c = tiny_config(bn_cross_replica=True)
  _train(c, tmp_path / 'eight', devices=8)
  _train(c, tmp_path / 'one')
  a, b = params_of(tmp_path / 'eight'), params_of(tmp_path / 'one')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # Per-replica statistics (the paper's 2-GPU setting) are a different computation.
  _train(tiny_config(), tmp_path / 'per_replica', devices=8)
  c_ = params_of(tmp_path / 'per_replica')
  assert not all(np.allclose(x, y, rtol=1e-4, atol=1e-5)
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c_)))


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_and_resumes_on_1(tmp_path):
  c = tiny_config(total_steps=2, **{'optimizer.schedule': 'step'})  # extensible
  _train(c, tmp_path, devices=8)
  saved = params_of(tmp_path)
  with tfds.testing.mock_data(num_examples=48):
    result = train.evaluate_checkpoint(tmp_path, devices=jax.devices()[:1])
    assert result['step'] == 2 and result['examples'] == 48
    c.total_steps = 4
    out = train.train_and_evaluate(c, tmp_path, devices=jax.devices()[:1])
  assert out['step'] == 4 and out['status'] == 'completed'
  resumed = params_of(tmp_path)
  assert int(resumed['step']) == 4
  assert not np.array_equal(saved['params']['classifier']['kernel'],
                            resumed['params']['classifier']['kernel'])


@pytest.mark.slow
def test_a_run_resumes_with_its_recorded_parallelism(tmp_path, caplog):
  """A run started under pmap (the default before shard_map) and resumed by a command
  that says shard_map goes on under pmap, bit for bit as if never stopped."""
  step = {'optimizer.schedule': 'step'}  # extensible: the resume adds a step
  _train(tiny_config(parallelism='pmap', total_steps=2, **step), tmp_path / 'cut', devices=8)
  with caplog.at_level('INFO', logger='preact'):
    _train(tiny_config(parallelism='shard_map', **step), tmp_path / 'cut', devices=8)
  assert 'resumes as it was recorded: parallelism=pmap (not shard_map)' in caplog.text
  assert json.loads((tmp_path / 'cut' / 'config.json').read_text())['parallelism'] == 'pmap'
  _train(tiny_config(parallelism='pmap', **step), tmp_path / 'whole', devices=8)
  for a, b in zip(jax.tree.leaves(params_of(tmp_path / 'whole')),
                  jax.tree.leaves(params_of(tmp_path / 'cut'))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_evaluation_counts_every_test_example_once(tmp_path):
  c = tiny_config(total_steps=1, eval_batch_size=32)  # 48 = 32 + 16 padded
  with tfds.testing.mock_data(num_examples=48):
    run = train.Run(config_lib.validate(c), tmp_path)
    state = run.init_state()
    result = run.evaluate(state)
    assert result['examples'] == 48
    # Against a plain single-device evaluation of the same weights.
    from preact import data
    images, labels = data.load_arrays('cifar10', 'test')
  x = data.normalize(images, run.mean, run.std, jnp.float32)
  logits = run.model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                           train=False)
  want_loss = float(step_lib.cross_entropy(logits, labels).mean())
  want_error = float(np.mean(np.argmax(logits, -1) != labels))
  assert result['loss'] == pytest.approx(want_loss, rel=1e-5)
  assert result['error'] == pytest.approx(want_error)


def test_tensorboard_reads_the_runs_scalars_probe_images_and_hparams(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  _train(tiny_config(log_every=1, probe_every=2, probe_batch=4), tmp_path)
  tb = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'),
                                          size_guidance={event_accumulator.TENSORS: 0})
  tb.Reload()
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  loss = [(e.step, e.tensor_proto.float_val[0]) for e in tb.Tensors('train_loss')]
  assert loss == [(r['step'], pytest.approx(r['train_loss'], rel=1e-6)) for r in rows]
  profiles = tb.Tensors('probe/profile')
  assert [e.step for e in profiles] == [0, 2, 3]  # and the last step
  width, height, png = profiles[0].tensor_proto.string_val
  assert png[:4] == b'\x89PNG' and int(width) > int(height) > 0
  assert tb.summary_metadata['probe/profile'].plugin_data.plugin_name == 'images'
  plugins = {m.plugin_data.plugin_name for m in tb.summary_metadata.values()}
  assert {'scalars', 'images', 'hparams'} <= plugins, plugins


@pytest.mark.slow
def test_divergence_is_recorded_as_the_outcome(tmp_path):
  c = tiny_config(total_steps=8, log_every=2)
  c.optimizer.lr = 1e30  # the first update overflows every parameter
  c.optimizer.schedule = 'step'
  out = _train(c, tmp_path)
  assert out['status'] == 'diverged' and 'not finite at step' in out['reason']
  saved = json.loads((tmp_path / 'outcome.json').read_text())
  assert saved['status'] == 'diverged' and saved['step'] == out['step'] <= 8
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  text = (tmp_path / 'metrics.jsonl').read_text()
  assert rows[-1]['step'] == out['step'] and 'NaN' not in text and 'Infinity' not in text


def test_bf16_computation_keeps_fp32_parameters(tmp_path):
  c = tiny_config(total_steps=1)
  c.model.dtype = 'bfloat16'
  with tfds.testing.mock_data(num_examples=48):
    run = train.Run(config_lib.validate(c), tmp_path)
    state = run.init_state()
    new, metrics = run.train_step(state, run.replicas.put_batch(run.train_data.batch(0)))
  assert {a.dtype for a in jax.tree.leaves(new.params)} == {jnp.dtype('float32')}
  assert {a.dtype for a in jax.tree.leaves(new.batch_stats)} == {jnp.dtype('float32')}
  assert np.isfinite(float(metrics['train_loss']))


@pytest.mark.slow
def test_float16_with_loss_scaling_trains_like_float32_and_resumes_exactly(tmp_path):
  step, f16 = {'optimizer.schedule': 'step'}, {'model.dtype': 'float16'}
  _train(tiny_config(**step), tmp_path / 'f32')
  _train(tiny_config(**step, **f16), tmp_path / 'f16')
  _train(tiny_config(total_steps=2, **step, **f16), tmp_path / 'cut')
  _train(tiny_config(**step, **f16), tmp_path / 'cut')
  for a, b in zip(jax.tree.leaves(params_of(tmp_path / 'f16')),
                  jax.tree.leaves(params_of(tmp_path / 'cut'))):
    np.testing.assert_array_equal(a, b)
  f32, f16 = params_of(tmp_path / 'f32'), params_of(tmp_path / 'f16')
  assert set(f16) - set(f32) == {'loss_scale'}  # float32 checkpoints keep their layout
  assert float(f16['loss_scale']['scale']) == 65536 and int(f16['loss_scale']['fin_steps']) == 3
  for a, b in zip(jax.tree.leaves(f32['params']), jax.tree.leaves(f16['params'])):
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0.05, atol=2e-3)
  rows = [json.loads(l) for l in (tmp_path / 'f16' / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['loss_scale'] == 65536


@pytest.mark.slow
def test_a_float16_step_whose_gradients_overflow_is_skipped_and_the_scale_halved(tmp_path):
  c = tiny_config(total_steps=1, **{'model.dtype': 'float16'})
  with tfds.testing.mock_data(num_examples=48):
    run = train.Run(config_lib.validate(c), tmp_path, devices=jax.devices()[:1])
    batch = run.replicas.put_batch(run.train_data.batch(0))
  state = run.init_state()
  # 2^100 times the loss: its gradient overflows float16's range (65504) in the backward.
  big = state.replace(loss_scale={'scale': jnp.float32(2.0 ** 100), 'fin_steps': jnp.int32(7)})
  before = jax.device_get(big)
  skipped, metrics = run.train_step(big, batch)
  assert float(skipped.loss_scale['scale']) == 2.0 ** 99
  assert int(skipped.loss_scale['fin_steps']) == 0 and int(skipped.step) == 1
  assert int(skipped.bad_step) == 0 and np.isfinite(float(metrics['train_loss']))
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((skipped.params, skipped.opt_state))):
    np.testing.assert_array_equal(a, b)
  applied, _ = run.train_step(run.init_state(), batch)  # 2^16: finite, applied
  assert float(applied.loss_scale['scale']) == 65536 and int(applied.loss_scale['fin_steps']) == 1
  assert not np.array_equal(before.params['classifier']['kernel'],
                            applied.params['classifier']['kernel'])


# --------------------------------------------------------------------------------------
# Bad input: one clear UserError, nothing overwritten.

@pytest.mark.parametrize('overrides,match', [
    ({'dataset': 'mnist'}, "dataset='mnist' is not one of"),
    ({'model.unit': 'preact'}, "model.unit='preact' is not one of"),
    ({'model.depth': 100}, r'depth 100 does not fit basic units: need 6n\+2'),
    ({'batch_size': 12}, 'batch_size 12 is not divisible by the 8 devices'),
    ({'model.unit': 'dropout_shortcut', 'model.unit_args.rate': 1.0}, r'\[0, 1\)'),
    ({'model.unit_args.bias': -3.0}, "unit 'full_preact': no argument"),
    ({'model.remat': 'yes'}, "model.remat='yes' is not one of: auto, on, off"),
    ({'model.scan': 'True'}, "model.scan='True' is not one of: auto, on, off"),
])
def test_bad_configs_are_user_errors(tmp_path, overrides, match):
  with pytest.raises(UserError, match=match):
    _train(tiny_config(**overrides), tmp_path, devices=8)


@pytest.mark.parametrize('remat,scan,depth,want', [
    ('auto', 'on', 20, False), ('auto', 'on', models.REMAT_AUTO_DEPTH, True),
    ('auto', 'off', 110, False), ('auto', 'auto', 110, False), ('auto', 'auto', 1001, True),
    ('on', 'auto', 20, True), ('off', 'on', 164, False)])
def test_remat_auto_is_on_for_deep_scanned_nets_on_cpu(remat, scan, depth, want):
  c = tiny_config(**{'model.remat': remat, 'model.scan': scan, 'model.depth': depth,
                     'model.block': 'auto'})
  assert jax.default_backend() == 'cpu'
  assert models.from_config(c, 10).remat is want


@pytest.mark.parametrize('scan,depth,kernels,want', [
    ('auto', 20, 'onednn', False), ('auto', 164, 'onednn', False),
    ('auto', models.SCAN_AUTO_DEPTH - 1, 'onednn', False),
    ('auto', models.SCAN_AUTO_DEPTH, 'onednn', True), ('auto', 1001, 'onednn', True),
    ('auto', 20, 'xla', True), ('auto', 20, 'off', True), ('on', 20, 'onednn', True),
    ('off', 1001, 'xla', False)])
def test_scan_auto_unrolls_onednn_cpu_nets_below_depth_200(scan, depth, kernels, want):
  from preact import onednn
  assert jax.default_backend() == 'cpu'
  if kernels == 'onednn' and not onednn.available():
    pytest.skip(onednn.why_unavailable())
  assert models.hardware(depth, scan=scan, cpu_kernels=kernels)['scan'] is want
  if depth in (20, 164, 1001):
    c = tiny_config(**{'model.scan': scan, 'model.depth': depth, 'model.block': 'auto',
                       'model.cpu_kernels': kernels})
    assert models.from_config(c, 10).scan is want


@pytest.mark.slow
def test_a_run_records_what_scan_auto_built_and_resumes_in_that_layout(tmp_path, caplog):
  """On a CPU with oneDNN's kernels, auto builds a ResNet-14 unrolled and the record
  says 'off'; a resume whose command means scanned (as auto does on an accelerator) goes
  on unrolled, the layout of its checkpoint, bit for bit as if never stopped."""
  from preact import onednn
  if not onednn.available():
    pytest.skip(onednn.why_unavailable())
  c = {'model.depth': 14, 'optimizer.schedule': 'step'}  # two units a stage
  _train(tiny_config(total_steps=2, **c), tmp_path / 'cut')
  assert json.loads((tmp_path / 'cut' / 'config.json').read_text())['model']['scan'] == 'off'
  assert 'stage1_unit2' in params_of(tmp_path / 'cut')['params']
  with caplog.at_level('INFO', logger='preact'):
    _train(tiny_config(**{'model.scan': 'on'}, **c), tmp_path / 'cut')
  assert 'resumes as it was recorded: model.scan=off (not on)' in caplog.text
  _train(tiny_config(**c), tmp_path / 'whole')
  for a, b in zip(jax.tree.leaves(params_of(tmp_path / 'whole')),
                  jax.tree.leaves(params_of(tmp_path / 'cut'))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('key', ['remat', 'scan'])
def test_configs_saved_with_a_boolean_remat_or_scan_still_load_and_resume(key):
  d = tiny_config().to_dict()
  d['model'][key] = True
  assert config_lib.from_dict(d).model[key] == 'on'
  now = tiny_config(**{f'model.{key}': 'on'}).to_dict()
  assert config_lib.differences(d, now) == []
  # A resume keeps the record's scan (config.RECORD_KEYS); remat must agree.
  assert config_lib.differences(d, tiny_config().to_dict()) == (
      ["model.remat: 'on' → 'auto'"] if key == 'remat' else [])


@pytest.mark.parametrize('bottleneck,one_layer,block', [
    (True, False, 'bottleneck'), (False, False, 'basic'), (False, True, 'one_layer')])
def test_records_of_older_versions_read_as_this_schema(bottleneck, one_layer, block):
  """Records that spelled the block as two booleans and the CPU kernels as cpu_conv read,
  compare and resume as the same run."""
  d = tiny_config(**{'model.block': block, 'model.cpu_kernels': 'off'}).to_dict()
  old = json.loads(json.dumps(d))
  del old['model']['block'], old['model']['cpu_kernels']
  old['model'].update(bottleneck=bottleneck, one_layer=one_layer, cpu_conv='off')
  c = config_lib.from_dict(old, source='config.json')
  assert (c.model.block, c.model.cpu_kernels) == (block, 'off')
  assert config_lib.differences(old, d) == []
  assert config_lib.differences(old, tiny_config(**{'model.block': 'bottleneck'}).to_dict()) \
      == ([] if block == 'bottleneck' else [f"model.block: '{block}' → 'bottleneck'"]) + \
      ["model.cpu_kernels: 'off' → 'auto'"]


def test_records_of_the_xla_formulations_before_onednn_read_as_xla():
  old = tiny_config().to_dict()
  old['model']['cpu_kernels'] = 'on'  # its spelling before oneDNN's kernels
  assert config_lib.from_dict(old, source='config.json').model.cpu_kernels == 'xla'


def test_unknown_config_key_is_a_user_error(tmp_path):
  c = tiny_config()
  c.model.deepth = 20
  with pytest.raises(UserError, match=r"unknown config key 'model.deepth'"):
    train.train_and_evaluate(c, tmp_path)


@pytest.mark.slow
def test_workdir_of_another_run_is_refused_and_left_alone(tmp_path):
  _train(tiny_config(total_steps=1), tmp_path)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  with pytest.raises(UserError, match=r'holds a different run \(config model.depth: 8 → 14'):
    _train(tiny_config(**{'model.depth': 14}), tmp_path)
  assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  # Bookkeeping keys may change on resume.
  _train(tiny_config(total_steps=1, log_every=7), tmp_path)


@pytest.mark.slow
def test_missing_and_corrupt_checkpoints_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='holds no run'):
    train.evaluate_checkpoint(tmp_path / 'nothing')
  _train(tiny_config(total_steps=2), tmp_path)
  with tfds.testing.mock_data(num_examples=48):
    with pytest.raises(UserError, match='no checkpoint for step 7'):
      train.evaluate_checkpoint(tmp_path, step=7)
  # Damage the saved arrays: restore must say so, not return garbage.
  for f in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(b'\0' * 16)
  with tfds.testing.mock_data(num_examples=48):
    with pytest.raises(UserError, match='cannot be restored'):
      train.evaluate_checkpoint(tmp_path)
    with pytest.raises(UserError, match='cannot be restored'):
      train.train_and_evaluate(tiny_config(total_steps=2), tmp_path)


def test_unreadable_data_dir_is_a_user_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match='data_dir'):
    train.train_and_evaluate(tiny_config(data_dir=str(blocker / 'tfds')), tmp_path / 'w')


@pytest.mark.slow
def test_profile_steps_write_an_xprof_trace_of_those_steps(tmp_path):
  outcome = _train(tiny_config(profile_steps=(2, 3)), tmp_path)
  assert outcome['status'] == 'completed'
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
