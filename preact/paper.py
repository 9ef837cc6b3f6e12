"""The paper's settings as config builders, shared by experiments/table*.py.

Every table file lists its rows (what differs, and the published test error) and calls
:func:`table_config`, so that every row is selected the same way:

  --config=experiments/table2.py:full_preact,depth=164
  --config=experiments/table1.py:exclusive_gating_b6,seed=3
  --config=experiments/table1.py:original,mini        # the Fashion-MNIST mini setting

Options after the row: ``depth=N``, ``seed=N``, ``mini`` (and any row-specific keys the
table file accepts).
"""

from __future__ import annotations

import dataclasses

from preact import config as config_lib


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a paper table: what it changes from the table's base, and its result."""
  unit: str = 'full_preact'
  error: float | dict | None = None  # test error % as published ({depth: %}); None: 'fail'
  depth: int | None = None           # None: the table's depth (or depth=N)
  unit_args: dict = dataclasses.field(default_factory=dict)
  overrides: dict = dataclasses.field(default_factory=dict)  # flat 'a.b' keys
  error_top5: float | None = None


def parse_arg(arg: str, rows: dict) -> tuple[str, dict]:
  """'row,key=value,flag' → (row, {key: value, flag: True})."""
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  if not tokens or '=' in tokens[0]:
    raise ValueError(f'name a row first; rows: {", ".join(rows)}')
  row, options = tokens[0], {}
  if row not in rows:
    raise ValueError(f'unknown row {row!r}; rows: {", ".join(rows)}')
  for t in tokens[1:]:
    key, _, value = t.partition('=')
    options[key] = _literal(value) if value else True
  return row, options


def _literal(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def set_flat(c, key: str, value):
  node = c
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f'no config key {key!r}')
  node[leaf] = tuple(value) if isinstance(value, list) else value


def cifar_recipe(c, dataset: str = 'cifar10'):
  """The authors' CIFAR recipe (paper appendix; fb.resnet.torch): SGD with momentum 0.9
  (Nesterov in the Torch code), weight decay 1e-4 on every parameter, batch 128, lr 0.1
  ÷10 at 32k and 48k iterations, 64k iterations, and on every row a warm-up at lr 0.01
  for the first 400 iterations ("for all CIFAR experiments")."""
  c.dataset = dataset
  c.batch_size = 128
  c.total_steps = 64_000
  c.optimizer.lr, c.optimizer.momentum, c.optimizer.nesterov = 0.1, 0.9, True
  c.optimizer.weight_decay, c.optimizer.decay = 1e-4, 'all'
  c.optimizer.schedule, c.optimizer.boundaries = 'step', (32_000, 48_000)
  c.optimizer.warmup_steps, c.optimizer.warmup_lr = 400, 0.01
  c.augment.crop_padding, c.augment.flip = 4, True
  c.eval_every = c.checkpoint_every = 2_000


def imagenet_recipe(c):
  """lr 0.1 ÷10 at epochs 30 and 60 (90 epochs), batch 256, no warm-up ("no warming
  up" on ImageNet, paper appendix)."""
  c.dataset = 'imagenet2012'
  c.model.arch = 'imagenet'
  c.batch_size = 256
  c.total_epochs = 90
  c.optimizer.boundary_epochs = (30, 60)
  c.optimizer.schedule, c.optimizer.warmup_steps = 'step', 0
  steps_per_epoch = config_lib.steps_per_epoch(c)
  c.eval_every = c.checkpoint_every = 5 * steps_per_epoch
  c.eval_batch_size = 500


def mini(c, depth: int):
  """The small-scale setting on Fashion-MNIST for a 2-core CPU: depth 110 → ResNet-20
  (basic, 3 units a stage; one-layer units: 6 a stage), 164 → ResNet-20 bottleneck (2
  units a stage), ImageNet rows → ResNet-20 of their unit; 300 steps of 64 (~1/3 epoch)
  with the same step schedule shape (÷10 at 50% and 75%), warm-up shortened to 20 steps
  at lr 0.01."""
  c.dataset = 'fashion_mnist'
  c.model.arch = 'cifar'  # ImageNet rows too: their unit, on the small network
  c.model.depth = 20
  if c.model.block != 'one_layer':
    c.model.block = 'bottleneck' if depth in (164, 1001) else 'basic'
  c.batch_size = 64
  c.total_steps, c.total_epochs = 300, 0.0
  c.optimizer.boundaries, c.optimizer.boundary_epochs = (150, 225), ()
  c.optimizer.warmup_steps, c.optimizer.warmup_lr = 20, 0.01
  c.augment.crop_padding = 0
  c.eval_every = c.checkpoint_every = 100
  c.log_every = c.probe_every = 20
  c.eval_batch_size = 1000


def block(depth: int, arch: str = 'cifar') -> str:
  """The paper's block (units.BLOCKS) at a depth: on CIFAR, bottleneck for 164 and 1001
  (and any 9n+2 that is not 6n+2), basic otherwise; ImageNet nets have their own."""
  if arch == 'imagenet':
    from preact import models
    return models.IMAGENET_NETS[depth][0] if depth in models.IMAGENET_NETS else 'basic'
  return 'bottleneck' if depth in (164, 1001) or (depth - 2) % 6 != 0 else 'basic'


def table_config(table: str, rows: dict[str, Row], arg: str, base_depth: int,
                 recipe=cifar_recipe):
  """The config of one row: ``recipe(c)`` (:func:`cifar_recipe`, :func:`imagenet_recipe`)
  then the row's changes, on the paper's block for the depth (:func:`block`)."""
  row_name, options = parse_arg(arg, rows)
  row = rows[row_name]
  depth = options.pop('depth', row.depth or base_depth)
  seed = options.pop('seed', 0)
  use_mini = options.pop('mini', False)
  if options:
    raise ValueError(f'unknown option(s) {", ".join(options)}; use depth=, seed=, mini')
  c = config_lib.base()
  recipe(c)
  c.model.unit = row.unit
  c.model.depth = depth
  c.model.block = block(depth, c.model.arch)
  for key, value in row.unit_args.items():
    c.model.unit_args[key] = float(value)
  for key, value in row.overrides.items():
    set_flat(c, key, value)
  error = row.error
  if isinstance(error, dict):
    if depth not in error:
      raise ValueError(f'row {row_name} has no published result at depth {depth}; '
                       f'depths: {", ".join(map(str, error))}')
    error = error[depth]
  c.seed = int(seed)
  c.paper.table, c.paper.row = table, f'{row_name}@{depth}' if isinstance(row.error, dict) \
      else row_name
  c.paper.fail = error is None
  c.paper.error = -1.0 if error is None else float(error)
  c.paper.error_top5 = -1.0 if row.error_top5 is None else float(row.error_top5)
  if use_mini:
    mini(c, depth)
    c.paper.mini = True
  return c
