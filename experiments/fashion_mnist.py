"""The embedded default: a pre-activation ResNet-20 on Fashion-MNIST, offline, on a CPU.

2.5 epochs with a cosine schedule. At this length the paper's random crops slow
learning more than they regularize, so only flips are kept, and weight decay is the
common 5e-4 on kernels. Its run of 2026-12-01 reached 91.60% test accuracy (error
8.40%; experiments/results/fashion_mnist holds its config, metrics and outcome).

  preact-train --config=experiments/fashion_mnist.py --workdir=runs/fashion_mnist
"""

from preact import config as config_lib


def get_config():
  c = config_lib.base()
  c.dataset = 'fashion_mnist'
  c.model.unit = 'full_preact'
  c.model.depth = 20
  c.model.block = 'basic'
  c.batch_size = 128
  c.total_steps = 1170          # 2.5 epochs of 60k
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 0  # the paper's 400 steps at 0.01 would be a third of the run
  c.optimizer.weight_decay = 5e-4
  c.optimizer.decay = 'weights'
  c.augment.crop_padding = 0
  c.augment.flip = True
  c.eval_every = 390
  c.checkpoint_every = 200
  c.log_every = 50
  c.probe_every = 90            # 14 probes of gradient flow over the run
  return c
