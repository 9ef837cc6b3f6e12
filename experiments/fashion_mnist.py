"""The embedded default: a pre-activation ResNet on Fashion-MNIST, offline, on a CPU.

A short cosine schedule sized to reach ≥ 91% test accuracy in under 15 minutes on 2
CPU cores. Run with:
  preact-train --config=experiments/fashion_mnist.py --workdir=runs/fashion_mnist
"""

from preact import config as config_lib


def get_config():
  c = config_lib.base()
  c.dataset = 'fashion_mnist'
  c.model.unit = 'full_preact'
  c.model.depth = 20
  c.model.bottleneck = False
  c.batch_size = 128
  c.total_steps = 940          # 2 epochs of 60k
  c.optimizer.schedule = 'cosine'
  c.optimizer.nesterov = True
  c.augment.crop_padding = 2
  c.augment.flip = True
  c.eval_every = 470
  c.checkpoint_every = 200
  c.log_every = 50
  return c
