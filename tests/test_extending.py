"""A researcher's own unit variant: registered in one place, every tool knows it."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from conftest import init
from preact import config as config_lib
from preact import models, plots, probes, units
from preact.cli import common


class BranchScaled(units.Shortcut):
  """A new shortcut with a new parameter: x_{l+1} = h + α·F."""
  alpha: float = 0.25

  @nn.compact
  def __call__(self, x, h, f, train):
    return h + self.alpha * f


MY_CONFIG = '''
from preact import config

def get_config():
  c = config.base()
  c.model.unit = 'scaled_branch'
  c.model.depth, c.model.block = 14, 'basic'
  return c
'''


@pytest.mark.slow
def test_a_unit_registered_in_one_place_configures_builds_probes_and_plots(
    monkeypatch, tmp_path):
  monkeypatch.setitem(units.UNITS, 'scaled_branch', units.UnitDef('full_preact', BranchScaled))

  # Configured from the command line, as preact-train's --config flag parses it.
  (tmp_path / 'mine.py').write_text(MY_CONFIG)
  argv = ['prog', f'--config={tmp_path}/mine.py', '--config.model.unit_args.alpha=1.0']
  flag_values = flags.FlagValues()
  flag_values(common.define_config(argv, '', flag_values=flag_values))
  c = config_lib.validate(flag_values.config)
  assert config_lib.unit_args(c.model) == {'alpha': 1.0}
  assert units.UNITS['scaled_branch'].params == {'alpha': 0.25}
  # Its run record reads back, and a record written before alpha existed still does.
  record = c.to_dict()
  assert config_lib.from_dict(record, source='config.json').model.unit_args.alpha == 1.0
  del record['model']['unit_args']['alpha']
  assert config_lib.from_dict(record, source='config.json').model.unit_args.alpha is None

  # Built: with α = 1 it is full pre-activation exactly, on the same parameters.
  model = models.from_config(c, 10)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = init(model, jax.random.key(1), x, train=False)
  apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))(variables, x)
  reference = model.clone(unit='full_preact', unit_args=None)
  np.testing.assert_array_equal(apply(model), apply(reference))
  assert not np.array_equal(apply(model.clone(unit_args=(('alpha', 0.5),))), apply(model))

  # Probed with the config's α, and plotted as a shortcut variant (dashed).
  with tfds.testing.mock_data(num_examples=8):
    results, identity = probes.probe_variants(c, ['scaled_branch', 'full_preact'], [14],
                                              batch=4)
  mine, full = results
  assert mine.info['unit'] == 'scaled_branch'
  np.testing.assert_allclose(mine.grad_norm, full.grad_norm, rtol=1e-6)  # α = 1
  assert identity['scaled_branch@14'] == [0.0, 0.0, 0.0]  # F ≡ 0 leaves h alone
  (tmp_path / 'out').mkdir()
  plots.probe_figures(results, identity, tmp_path / 'out')
  assert {p.name for p in (tmp_path / 'out').iterdir()} == {
      'grad_norm.png', 'act_norm.png', 'identity.png'}
  assert plots._line_style('scaled_branch') == '--'
  assert plots._line_style('full_preact') == '-'


@pytest.mark.parametrize('args,message', [
    ({'rate': 1.0}, r"unit 'dropout_shortcut': dropout rate must be in \[0, 1\), got 1.0"),
    ({'bias': 1.0}, r"unit 'dropout_shortcut': no argument\(s\) bias; valid: rate$"),
    ({'rate': 'high'}, r"unit 'dropout_shortcut': unit argument rate must be a number"),
])
def test_a_shortcut_checks_its_own_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    units.get_unit('dropout_shortcut', args)
  unit, combine = units.get_unit('dropout_shortcut', {'rate': 0.2})
  assert combine.keywords == {'rate': 0.2} and unit.params == {'rate': 0.5}
