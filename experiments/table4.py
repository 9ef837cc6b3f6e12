"""Table 4: our (the paper's) pre-activation ResNets on CIFAR-10 and CIFAR-100.

  --config=experiments/table4.py:c10_1001[,seed=N]
"""

from preact.paper import Row, table_config

ROWS = {  # row: published test error % (the paper's medians of 5 runs)
    'c10_164': Row('full_preact', 5.46, depth=164),
    'c100_164': Row('full_preact', 24.33, depth=164, overrides={'dataset': 'cifar100'}),
    'c10_1001': Row('full_preact', 4.92, depth=1001),
    'c100_1001': Row('full_preact', 22.71, depth=1001, overrides={'dataset': 'cifar100'}),
    # KaimingHe/resnet-1k-layers README: batch 64 on 2 GPUs gave 4.62% (4.69 ± 0.20), run
    # as `-batchSize 64 -nEpochs 200` in fb.resnet.torch, whose CIFAR schedule (train.lua)
    # divides lr by 10 from epoch 81 and again from 122 (1-based): after 80 and 121
    # epochs. At 782 steps an epoch that is 156,400 iterations, not 64k.
    'c10_1001_batch64': Row('full_preact', 4.62, depth=1001, overrides={
        'batch_size': 64, 'total_epochs': 200, 'optimizer.boundary_epochs': (80, 121)}),
}


def get_config(arg='c10_1001'):
  return table_config('table4', ROWS, arg, base_depth=164)
