"""Table 3: original vs pre-activation units on CIFAR-10 and CIFAR-100.

  --config=experiments/table3.py:c10_1001_full_preact[,seed=N]
"""

from preact.paper import Row, table_config

_SETTINGS = {  # setting: depth, dataset, (original %, pre-activation %)
    'c10_110_1layer': (110, 'cifar10', (9.90, 8.91)),
    'c10_110': (110, 'cifar10', (6.61, 6.37)),
    'c10_164': (164, 'cifar10', (5.93, 5.46)),
    'c10_1001': (1001, 'cifar10', (7.61, 4.92)),
    'c100_164': (164, 'cifar100', (25.16, 24.33)),
    'c100_1001': (1001, 'cifar100', (27.82, 22.71)),
}
ROWS = {
    f'{setting}_{unit}': Row(unit, errors[i], depth=depth, overrides={
        'dataset': dataset, **({'model.block': 'one_layer'} if '1layer' in setting else {})})
    for setting, (depth, dataset, errors) in _SETTINGS.items()
    for i, unit in enumerate(('original', 'full_preact'))
}


def get_config(arg='c10_1001_full_preact'):
  return table_config('table3', ROWS, arg, base_depth=164)
