"""Table 1: shortcut variants (paper Fig. 2), ResNet-110 with the original unit, CIFAR-10.

  --config=experiments/table1.py:exclusive_gating_b6[,seed=N][,mini]
"""

from preact.paper import Row, table_config

ROWS = {  # row: unit, published test error % (None = "fail"), shortcut parameters
    'original': Row('original', 6.61),
    # λ = 0 with F unscaled: no shortcut at all, "fail — this is a plain net".
    'constant_scaling_0_1': Row('constant_scaling', None, unit_args=dict(scale=0.0, branch_scale=1.0)),
    'constant_scaling_0.5_1': Row('constant_scaling', None, unit_args=dict(scale=0.5, branch_scale=1.0)),
    'constant_scaling_0.5_0.5': Row('constant_scaling', 12.35, unit_args=dict(scale=0.5, branch_scale=0.5)),
    # The paper's row covers b_g = 0 … −5, all "fail"; b_g = 0 stands for it.
    'exclusive_gating_b0': Row('exclusive_gating', None, unit_args=dict(bias=0.0)),
    'exclusive_gating_b6': Row('exclusive_gating', 8.70, unit_args=dict(bias=-6.0)),
    'exclusive_gating_b7': Row('exclusive_gating', 9.81, unit_args=dict(bias=-7.0)),
    'shortcut_only_gating_b0': Row('shortcut_only_gating', 12.86, unit_args=dict(bias=0.0)),
    'shortcut_only_gating_b6': Row('shortcut_only_gating', 6.91, unit_args=dict(bias=-6.0)),
    'conv_shortcut': Row('conv_shortcut', 12.22),
    'dropout_shortcut': Row('dropout_shortcut', None, unit_args=dict(rate=0.5)),
}


def get_config(arg='original'):
  return table_config('table1', ROWS, arg, base_depth=110)
