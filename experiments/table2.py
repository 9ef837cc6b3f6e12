"""Table 2: activation placements (paper Fig. 4) on CIFAR-10, ResNet-110 and ResNet-164.

  --config=experiments/table2.py:full_preact,depth=164[,seed=N][,mini]
"""

from preact.paper import Row, table_config

ROWS = {  # row: unit, published test error % at depth 110 / 164
    'original': Row('original', {110: 6.61, 164: 5.93}),
    'bn_after_addition': Row('bn_after_addition', {110: 8.17, 164: 6.50}),
    'relu_before_addition': Row('relu_before_addition', {110: 7.84, 164: 6.14}),
    'relu_only_preact': Row('relu_only_preact', {110: 6.71, 164: 5.91}),
    'full_preact': Row('full_preact', {110: 6.37, 164: 5.46}),
}


def get_config(arg='full_preact,depth=164'):
  return table_config('table2', ROWS, arg, base_depth=164)
