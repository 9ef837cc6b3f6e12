"""The config schema: every key a run understands, with the paper's CIFAR recipe as
defaults. Experiment files start from :func:`base` and override what they change, so a
key that is not here is a typo and is rejected."""

from __future__ import annotations

import json
import math

import ml_collections

from preact import data, legacy, units
from preact.errors import UserError

# Keys a resumed run may change: they affect bookkeeping, never the trajectory.
RUNTIME_KEYS = frozenset({'checkpoint_every', 'eval_every', 'log_every', 'keep_checkpoints',
                          'progress', 'data_dir', 'manual_dir', 'distributed',
                          'eval_batch_size', 'prefetch', 'profile_steps', 'probe_every',
                          'probe_batch', 'experiment'})


# Keys a resumed run takes from its record rather than from the command: they change
# results only by float rounding, so keeping the record's keeps a resume bit-identical
# (a run started when pmap was the default resumes under pmap; one that ran unrolled on
# a CPU resumes unrolled on a GPU, its checkpoint's layout).
RECORD_KEYS = frozenset({'parallelism', 'model.scan'})


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = ''            # the config file's name (set on loading it): titles reports
  c.dataset = 'cifar10'        # cifar10 | cifar100 | fashion_mnist | imagenet2012
  c.data_dir = ''              # TFDS data_dir ('' = TFDS's default); may be gs://
  c.manual_dir = ''            # imagenet2012's manually downloaded archives
  c.batch_size = 128           # global, over all devices and hosts
  c.eval_batch_size = 500
  c.total_steps = 64_000
  # > 0: the run's length in epochs of the train split, ceil(examples / batch_size) steps
  # each as in fb.resnet.torch; it then sets total_steps.
  c.total_epochs = 0.0
  c.seed = 0
  c.checkpoint_every = 2_000
  c.keep_checkpoints = 3
  c.eval_every = 2_000
  c.log_every = 100
  c.progress = 'auto'          # auto | bar | log
  c.prefetch = 2               # batches prepared ahead on a host thread
  # (first, last): an XProf trace of those steps in WORKDIR/profile (process 0), for
  # `tensorboard --logdir WORKDIR/profile` or xprof; () = none.
  c.profile_steps = ()
  # Every probe_every steps (and at steps 0 and total_steps), the exact ∂L/∂x_l, ratio,
  # cosine and ‖x_l‖ per unit (preact.probes.TrainingProbe) of the state on the first
  # probe_batch training examples, into WORKDIR/probes.jsonl and TensorBoard; 0 = never.
  c.probe_every = 1_000
  c.probe_batch = 32

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'cifar'       # cifar | imagenet
  c.model.unit = 'full_preact'
  c.model.depth = 164
  # auto (the paper's block for the depth, preact.paper.block) | basic | bottleneck |
  # one_layer (Table 3's "1-layer skip"); validation writes the resolved block back.
  c.model.block = 'auto'
  # A stage's first unit changes shape through: auto (the paper's: projection for
  # bottleneck and ImageNet nets, zero_pad for basic and 1-layer CIFAR nets) | projection
  # (1×1 conv) | zero_pad (option A of He et al., CVPR 2016: no parameters)
  c.model.shortcut = 'auto'
  # Shortcut parameters (paper Fig. 2); unset ones take the unit's defaults.
  # The keys are every registered shortcut's parameters (units.UNITS).
  c.model.unit_args = ml_collections.ConfigDict(
      {k: ml_collections.config_dict.placeholder(type(default))
       for k, default in units.unit_params().items()})
  c.model.zero_init_last = False
  c.model.dtype = 'float32'    # computation dtype; parameters and BN statistics stay fp32
  # Run a stage's identical units under nn.scan (one compiled body, so ResNet-1001
  # compiles in seconds) or unrolled: auto = unrolled on CPU with oneDNN's kernels below
  # depth 200, where it runs faster, else scanned (models.SCAN_AUTO_DEPTH). A run records
  # what auto chose.
  c.model.scan = 'auto'        # auto | on | off
  # Recompute each unit's activations in the backward pass instead of storing them:
  # auto = on for a scanned net on CPU from depth 56, where it is also faster
  # (docs/performance.md); unrolled, it saves no memory on XLA:CPU.
  c.model.remat = 'auto'       # auto | on | off
  # CPU conv and BN kernels: auto | onednn (preact.onednn) | xla (preact.cpu_kernels) |
  # off (XLA's own, as on GPU/TPU); auto = onednn where built, else xla; off a CPU, off.
  c.model.cpu_kernels = 'auto'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True          # fb.resnet.torch
  c.optimizer.weight_decay = 1e-4
  c.optimizer.decay = 'all'            # all (the authors' Torch code) | weights (kernels)
  c.optimizer.schedule = 'step'        # step | cosine
  c.optimizer.boundaries = (32_000, 48_000)
  # Non-empty: the boundaries in epochs instead (after that many epochs, as total_epochs).
  c.optimizer.boundary_epochs = ()
  c.optimizer.decay_factor = 0.1
  # The paper's appendix: "for all CIFAR experiments we warm up the training by using a
  # smaller learning rate of 0.01 at the beginning 400 iterations".
  c.optimizer.warmup_steps = 400       # at warmup_lr, then lr
  c.optimizer.warmup_lr = 0.01

  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 4           # zero padding before the random crop; 0 = no crop
  c.augment.flip = True
  c.augment.imagenet = 'scale'         # ImageNet: scale | scale_aspect (see imagenet.py)
  c.augment.scale_range = (256, 480)   # 'scale': shorter side drawn from this range
  c.augment.area_range = (0.08, 1.0)   # 'scale_aspect': crop area fraction
  c.augment.aspect_range = (3 / 4, 4 / 3)  # 'scale_aspect': crop aspect ratio
  c.augment.image_size = 224           # ImageNet train crop
  c.augment.eval_resize = 256          # ImageNet: shorter side before the center crop
  c.augment.eval_crop = 224            # ImageNet: 224, or 320 for the paper's 320 test

  # shard_map: one jit over a Mesh of all devices, batch and state as NamedShardings,
  # the per-replica step (per-replica BN) under jax.shard_map. pmap: the same step
  # under jax.pmap, JAX's older API; on one device the two are bitwise equal.
  c.parallelism = 'shard_map'          # shard_map | pmap
  c.bn_cross_replica = False           # False: BN statistics per replica, as on 2 GPUs
  c.distributed = False                # jax.distributed.initialize() (multi-host)

  c.paper = ml_collections.ConfigDict()  # what the paper reports for this setting
  c.paper.table = ''
  c.paper.row = ''
  c.paper.error = -1.0                 # test error % (top-1), -1 = none
  c.paper.error_top5 = -1.0            # ImageNet top-5 error %, -1 = none
  c.paper.fail = False                 # the paper reports "fail" (error stayed > 20%)
  c.paper.mini = False                 # the small-scale Fashion-MNIST setting
  return c


_CHOICES = {
    'progress': ('auto', 'bar', 'log'),
    'model.arch': ('cifar', 'imagenet'),
    'augment.imagenet': ('scale', 'scale_aspect'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.cpu_kernels': ('auto', 'onednn', 'xla', 'off'),
    'model.block': ('auto', 'basic', 'bottleneck', 'one_layer'),
    'model.shortcut': ('auto', 'projection', 'zero_pad'),
    'model.remat': ('auto', 'on', 'off'),
    'model.scan': ('auto', 'on', 'off'),
    'optimizer.decay': ('all', 'weights'),
    'optimizer.schedule': ('step', 'cosine'),
    'parallelism': ('shard_map', 'pmap'),
}


# Numeric keys: (low, high, low excluded, high excluded).
_RANGES = {
    'optimizer.lr': (0, math.inf, True, False),
    'optimizer.momentum': (0, 1, False, True),
    'optimizer.weight_decay': (0, math.inf, False, False),
    'optimizer.decay_factor': (0, 1, True, False),
    'optimizer.warmup_lr': (0, math.inf, False, False),
    'optimizer.warmup_steps': (0, math.inf, False, False),
    'total_epochs': (0, math.inf, False, False),
    'prefetch': (0, 64, False, False),
    'augment.crop_padding': (0, 64, False, False),
}


flatten = legacy.flatten


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks keys and values; raises UserError with one line saying what to fix."""
  known, got = flatten(base()), flatten(config)
  for key in got:
    if key not in known:
      close = [k for k in known if k.split('.')[-1] == key.split('.')[-1]]
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise UserError(f'unknown config key {key!r}{hint}')
  for key in known:
    if key not in got:
      raise UserError(f'config lacks key {key!r}: start experiment configs from '
                      'preact.config.base()')
  # The registries are read now, not at import, so that a unit or data set registered
  # later (by an experiment file, say) is a valid choice.
  registries = {'dataset': tuple(data.DATASETS), 'model.unit': tuple(units.UNITS)}
  for key, choices in {**registries, **_CHOICES}.items():
    if got[key] not in choices:
      raise UserError(f'{key}={got[key]!r} is not one of: {", ".join(choices)}')
  for key in ('batch_size', 'eval_batch_size', 'total_steps', 'checkpoint_every',
              'eval_every', 'log_every', 'keep_checkpoints', 'probe_batch'):
    if not isinstance(got[key], int) or got[key] < 1:
      raise UserError(f'{key} must be a positive integer, got {got[key]!r}')
  if not isinstance(got['probe_every'], int) or got['probe_every'] < 0:
    raise UserError(f'probe_every must be 0 (no probes) or a positive integer, got '
                    f'{got["probe_every"]!r}')
  for key, (low, high, low_open, high_open) in _RANGES.items():
    value = got[key]
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
        or not math.isfinite(value) or value < low or value > high
        or (low_open and value == low) or (high_open and value == high)):
      interval = (f'{"(" if low_open else "["}{low:g}, '
                  f'{high:g}{")" if high_open else "]"}').replace('inf', '∞')
      raise UserError(f'{key} must be a number in {interval}, got {value!r}')
  p = tuple(config.profile_steps)
  if p and not (len(p) == 2 and all(isinstance(v, int) and v >= 1 for v in p)
                and p[0] <= p[1]):
    raise UserError(f'profile_steps must be () or (first, last) with 1 <= first <= last, '
                    f'got {p}')
  o = config.optimizer
  _resolve_epochs(config)
  if list(o.boundaries) != sorted(o.boundaries) or any(b < 1 for b in o.boundaries):
    raise UserError(f'optimizer.boundaries must be positive and increase, got '
                    f'{tuple(o.boundaries)}')
  if o.warmup_steps and o.warmup_steps >= config.total_steps:
    raise UserError(f'optimizer.warmup_steps ({o.warmup_steps}) must be shorter than the '
                    f'run (total_steps {config.total_steps}); set it to 0 or fewer steps')
  try:
    units.get_unit(config.model.unit, unit_args(config.model))
  except ValueError as e:
    raise UserError(str(e)) from None
  if config.model.block == 'auto':
    from preact import paper
    config.model.block = paper.block(config.model.depth, config.model.arch)
  return config


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Steps in one pass over the train split: fb.resnet.torch's DataLoader:size(),
  ceil(examples / batch); our batches are all full, drawn from a fresh permutation."""
  return -(-data.spec(config.dataset).train_examples // config.batch_size)


def _resolve_epochs(config: ml_collections.ConfigDict) -> None:
  """Epoch-based durations into steps, so that the rest of the code reads steps only."""
  epochs, bounds = config.total_epochs, tuple(config.optimizer.boundary_epochs)
  if epochs < 0 or any(b <= 0 for b in bounds):
    raise UserError(f'total_epochs and optimizer.boundary_epochs must be positive, got '
                    f'{epochs} and {bounds}')
  per_epoch = steps_per_epoch(config)
  if epochs:
    config.total_steps = int(-(-epochs * per_epoch // 1))
  if bounds:
    config.optimizer.boundaries = tuple(int(round(b * per_epoch)) for b in bounds)


def unit_args(model: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in model.unit_args.items() if v is not None}


def from_dict(d: dict, source: str | None = None) -> ml_collections.ConfigDict:
  """A config saved as JSON (config.json) back into the schema; JSON lists become the
  schema's tuples again. With ``source`` (the file it came from) the config must be
  complete and valid: a partial record is refused, never filled in with defaults."""
  c = base()
  saved = legacy.migrate(flatten(ml_collections.ConfigDict(d)))
  if source is not None:
    # An unset unit argument means the unit's default, so a record written before a
    # shortcut parameter was registered still says everything about its run.
    # A runtime key changes no result, so one added after the record was written takes
    # its default.
    missing = sorted(k for k in set(flatten(c)) - set(saved) - RUNTIME_KEYS
                     if not k.startswith('model.unit_args.'))
    if missing:
      raise UserError(f'{source} is not a complete run config (it lacks '
                      f'{", ".join(missing[:3])}{", …" if len(missing) > 3 else ""}); put back '
                      'the config.json the run wrote')
  for key, value in saved.items():
    *parents, leaf = key.split('.')
    node = c
    try:
      for p in parents:
        node = node[p]
      if isinstance(node[leaf], tuple) and isinstance(value, list):
        value = tuple(value)
      node[leaf] = value
    except (KeyError, TypeError) as e:
      raise UserError(f'saved config has a bad key or value {key}={value!r} ({e})') from None
  if source is not None:
    try:
      validate(c)
    except UserError as e:
      raise UserError(f'{source}: {e}') from None
  return c


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def differences(a: dict, b: dict) -> list[str]:
  """'key: old → new' for every key whose value differs (JSON-normalized)."""
  fa = legacy.migrate(flatten(ml_collections.ConfigDict(a)))
  fb = legacy.migrate(flatten(ml_collections.ConfigDict(b)))
  allowed = set(RUNTIME_KEYS | RECORD_KEYS)
  if fa.get('optimizer.schedule') == fb.get('optimizer.schedule') == 'step':
    allowed.add('total_steps')  # extending a step schedule leaves the steps so far alone
  norm = lambda v: json.loads(json.dumps(v, default=list))
  return [f'{k}: {norm(fa.get(k))!r} → {norm(fb.get(k))!r}'
          for k in sorted(set(fa) | set(fb))
          if k not in allowed and norm(fa.get(k)) != norm(fb.get(k))]
