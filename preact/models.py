"""The networks: the authors' CIFAR ResNets and the ImageNet ResNets, any unit variant.

Identical units of a stage (all but its first) run under ``nn.scan`` so that a
1001-layer net compiles one unit body per stage rather than 333 copies of it.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from preact import cpu_kernels, layers
from preact.units import SHORTCUTS, ResidualUnit, bn_relu, get_unit

# Collections stacked along the scan axis: one slice per unit.
_SCANNED = {'params': 0, 'batch_stats': 0, 'perturbations': 0, 'intermediates': 0}


class ResNet(nn.Module):
  """A stem, stages of residual units, a head. Stage s has ``stage_sizes[s]`` units."""
  unit: str = 'full_preact'
  stage_sizes: Sequence[int] = (18, 18, 18)
  widths: Sequence[int] = (64, 128, 256)
  strides: Sequence[int] = (1, 2, 2)
  block: str = 'bottleneck'  # units.BLOCKS
  # How the first unit of a stage changes shape: 'projection' (a 1×1 conv) or
  # 'zero_pad' (option A of He et al., CVPR 2016: subsample, zero-fill new channels).
  shortcut: str = 'projection'
  stem: str = 'cifar'  # 'cifar': one 3×3 conv; 'imagenet': 7×7/2 conv, 3×3/2 max pool
  stem_width: int = 16
  num_classes: int = 10
  unit_args: Any = None
  zero_init_last: bool = False
  dtype: Any = jnp.float32
  scan: bool = True
  remat: bool = False
  bn_axis_name: str | None = None  # 'batch' for BN statistics across replicas
  bn_momentum: float = 0.9  # Torch's momentum 0.1 in Flax's convention
  bn_epsilon: float = 1e-5
  # Conv and BN kernels: 'off' (XLA's own, as on GPU and TPU), or on a CPU 'xla'
  # (preact.cpu_kernels' formulations) or 'onednn' (preact.onednn); see hardware().
  cpu_kernels: str = 'off'
  # Whether scanned units pass x_l on in float32 when computing in 16 bits (FloatCarry):
  # None is yes with remat and CPU kernels, where it is faster.
  float_carry: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    unit, combine = get_unit(self.unit, self.unit_args)
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f'unknown shortcut {self.shortcut!r}; valid: {", ".join(SHORTCUTS)}')
    conv_ops, norm_cls, fuses_relu = kernels(self.cpu_kernels)
    conv = functools.partial(layers.Conv, dtype=self.dtype, **conv_ops)
    norm = functools.partial(norm_cls, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, axis_name=self.bn_axis_name)
    norm_relu = functools.partial(norm, relu=True) if fuses_relu else None

    imagenet = self.stem == 'imagenet'
    x = conv(self.stem_width, (7, 7) if imagenet else (3, 3), (2, 2) if imagenet else (1, 1),
             name='stem')(x)
    # Every net activates conv1's output before the first unit splits into branch and
    # shortcut: the original ResNet as always, pre-activation nets because the paper's
    # appendix adopts "the first activation right after conv1 and before splitting into
    # two paths" (preresnet.lua: conv1-BN-ReLU, then a 'no_preact' first unit).
    x = bn_relu(norm, norm_relu, x, train, name='stem_bn')
    if imagenet:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))

    def remat(cls):
      return (nn.remat(cls, static_argnums=(2,), prevent_cse=not self.scan) if self.remat
              else cls)

    float_carry = self.float_carry
    if float_carry is None:
      float_carry = (self.remat and self.cpu_kernels != 'off'
                     and jnp.dtype(self.dtype).itemsize < 4)
    for s, (n, width, stride) in enumerate(zip(self.stage_sizes, self.widths, self.strides)):
      same = dict(unit=unit, combine=combine, features=width, block=self.block,
                  zero_init_last=self.zero_init_last, conv=conv, norm=norm,
                  norm_relu=norm_relu)
      make = functools.partial(remat(ResidualUnit), **same)
      x = make(strides=stride, first=True, activated_input=s == 0, shortcut=self.shortcut,
               name=f'stage{s + 1}_unit1')(x, train)
      if n > 1 and self.scan:
        body = nn.scan(lambda unit, carry, _: (unit(carry, train), None),
                       variable_axes=_SCANNED, split_rngs={'params': True, 'dropout': True},
                       length=n - 1)
        if float_carry:
          rest = remat(FloatCarry)(**same, compute_dtype=self.dtype,
                                   name=f'stage{s + 1}_rest')
          x = body(rest, x.astype(jnp.float32), None)[0].astype(self.dtype)
        else:
          x, _ = body(make(name=f'stage{s + 1}_rest'), x, None)
      else:
        for j in range(2, n + 1):
          x = make(name=f'stage{s + 1}_unit{j}')(x, train)

    # After a bare addition the signal is unnormalized: pre-activation nets end with
    # BN-ReLU (resnet-pre-act.lua).
    if unit.layout.raw_output:
      x = bn_relu(norm, norm_relu, x, train, name='head_bn')
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.torch_linear_init,
                 name='classifier')(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # fp32 logits from bf16


class FloatCarry(ResidualUnit):
  """A residual unit computing in a 16-bit ``compute_dtype`` that takes and returns x_l
  in float32; the same numbers, since x_l is a 16-bit value either way.

  Remat in a scan stacks every unit's input, and XLA:CPU writes a bfloat16 stack by
  converting all of it to float32 and back at every unit: ResNet-164's bf16 step spent
  400 ms of 1.9 s there (``preact-bench --mode=profile --dtype=bfloat16``). A float32
  stack takes twice the memory and is written in place. (Without remat the stacks hold
  what the units compute from x_l, in 16 bits either way.)"""
  compute_dtype: Any = jnp.bfloat16

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return super().__call__(x.astype(self.compute_dtype), train).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Constructors.

# Per block: convs per unit (depth = that × units + 2, for conv1 and the classifier), the
# form and examples of such depths, and the stage widths (the units' outputs).
CIFAR_BLOCKS = {'basic': (2, '6n+2', 'e.g. 20, 56, 110, 1202', (16, 32, 64)),
                'bottleneck': (3, '9n+2', 'e.g. 164, 1001', (64, 128, 256)),
                'one_layer': (1, '3n+2', 'e.g. 110', (16, 32, 64))}


def cifar_stages(depth: int, block: str) -> tuple[int, tuple[int, int, int]]:
  """(units per stage, stage widths) of the authors' CIFAR net of ``depth`` layers built
  of ``block`` units (resnet-pre-act.lua: 3 stages, 16-channel 3×3 stem)."""
  if block not in CIFAR_BLOCKS:
    raise ValueError(f'unknown block {block!r}; valid: {", ".join(CIFAR_BLOCKS)}')
  convs, form, examples, widths = CIFAR_BLOCKS[block]
  per_unit = 3 * convs
  if not isinstance(depth, (int, np.integer)) or depth < 2 + per_unit or (depth - 2) % per_unit:
    valid = [k for k, (c, *_) in CIFAR_BLOCKS.items()
             if isinstance(depth, (int, np.integer)) and depth > 2 and (depth - 2) % (3 * c) == 0]
    hint = f'; depth {depth} fits: {", ".join(valid)}' if valid else ''
    raise ValueError(f'depth {depth} does not fit {block} units: need {form} ({examples})'
                     + hint)
  return (depth - 2) // per_unit, widths


def cifar_resnet(depth: int, unit: str = 'full_preact', block: str = 'basic',
                 num_classes: int = 10, shortcut: str = 'auto', **kwargs) -> ResNet:
  """The authors' CIFAR ResNet (resnet-pre-act.lua): 3 stages, 16-channel 3×3 stem.

  Basic units give depth 6n+2 (widths 16/32/64), bottleneck units 9n+2 (outputs
  64/128/256, inner width out/4), the "1-layer skip" unit 3n+2 (widths 16/32/64).

  ``shortcut='auto'`` is the paper's choice at a stage change: bottleneck nets project
  with a 1×1 conv (appendix, resnet-pre-act.lua); basic and 1-layer nets follow the
  CIFAR nets of He et al. (CVPR 2016), "identity shortcuts in all cases" (option A).
  """
  n, widths = cifar_stages(depth, block)
  _check_unit_args(unit, kwargs)
  if shortcut == 'auto':
    shortcut = 'projection' if block == 'bottleneck' else 'zero_pad'
  return ResNet(unit=unit, stage_sizes=(n, n, n), widths=widths, strides=(1, 2, 2),
                block=block, shortcut=shortcut, stem='cifar', stem_width=16,
                num_classes=num_classes, **kwargs)


def _check_unit_args(unit: str, kwargs: dict):
  """Validates the unit and freezes its arguments into sorted pairs, so that the
  module stays hashable (jit takes models as static arguments)."""
  get_unit(unit, kwargs.get('unit_args'))
  if kwargs.get('unit_args'):
    kwargs['unit_args'] = tuple(sorted(dict(kwargs['unit_args']).items()))


# Depth → (block, units per stage): He et al. (CVPR 2016), Table 1.
IMAGENET_NETS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
                 50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3)),
                 152: ('bottleneck', (3, 8, 36, 3)), 200: ('bottleneck', (3, 24, 36, 3))}


def imagenet_resnet(depth: int, unit: str = 'full_preact', num_classes: int = 1000,
                    shortcut: str = 'auto', block: str = 'auto', **kwargs) -> ResNet:
  """ImageNet ResNet-18…200 (paper Table 5): basic units below 50 layers, bottleneck
  from 50 on, stages of 64/128/256/512 inner channels (outputs ×4 for bottlenecks).

  * Stem: a 7×7 conv with stride 2 (64 channels), BN-ReLU, a 3×3 max pool with
    stride 2; every variant activates conv1 before the first unit, as the paper's
    appendix does for pre-activation and the original ResNet always did.
  * Stride: on the first conv of a stage's first unit, i.e. the first 1×1 of a
    bottleneck, as in the authors' Caffe nets of He et al. (CVPR 2016).
    fb.resnet.torch (preresnet.lua, resnet.lua) and timm put it on the 3×3 instead.
  * Shortcuts: identity, except at a stage's first unit, whose shortcut is a strided
    1×1 conv ('auto' = projection, fb.resnet.torch's type B), reading the unit's
    pre-activation in pre-activation nets and with a BN after it where the branch
    ends in BN (the original unit).
  * End: BN-ReLU where the last unit ends in a bare addition, global average pool,
    a 1000-way linear classifier.
  """
  if depth not in IMAGENET_NETS:
    raise ValueError(f'no ImageNet ResNet of depth {depth}; valid depths: '
                     f'{", ".join(map(str, IMAGENET_NETS))}')
  own, stages = IMAGENET_NETS[depth]
  if block not in ('auto', own):
    raise ValueError(f'ImageNet ResNet-{depth} is built of {own} units, not {block}; '
                     'leave the block on auto')
  widths = (256, 512, 1024, 2048) if own == 'bottleneck' else (64, 128, 256, 512)
  _check_unit_args(unit, kwargs)
  return ResNet(unit=unit, stage_sizes=stages, widths=widths, strides=(1, 2, 2, 2),
                block=own, shortcut='projection' if shortcut == 'auto' else shortcut,
                stem='imagenet', stem_width=64, num_classes=num_classes, **kwargs)


# From this depth on XLA:CPU runs a scanned net's step faster with remat than without
# (measured, preact-bench --mode=sweep): storing its activations costs more than
# recomputing them.
REMAT_AUTO_DEPTH = 56


CPU_KERNELS = ('onednn', 'xla', 'off')


def kernels(name: str):
  """(``preact.layers.Conv``'s ops, batch-norm module, whether that module fuses a ReLU)
  of a kernel set: XLA's own ('off'), its CPU formulations ('xla'), or oneDNN's
  primitives through the FFI ('onednn')."""
  if name == 'off':
    return dict(op=layers.xla_conv), nn.BatchNorm, False
  if name == 'xla':
    return dict(op=cpu_kernels.conv), cpu_kernels.BatchNorm, False
  if name == 'onednn':
    from preact import onednn
    return (dict(op=onednn.conv, add_op=onednn.conv_add),
            functools.partial(cpu_kernels.BatchNorm, train_op=onednn.batch_norm_train,
                              infer_op=onednn.batch_norm_inference), True)
  raise ValueError(f'unknown cpu_kernels {name!r}; valid: auto, {", ".join(CPU_KERNELS)}')


def cpu_kernel_set(setting: str = 'auto') -> str:
  """The kernel set a config's ``model.cpu_kernels`` means on this backend: 'auto' is
  oneDNN on a CPU where it is built (``python -m preact.onednn.build``), else XLA's CPU
  formulations; off a CPU, XLA's own."""
  from preact import onednn
  cpu = jax.default_backend() == 'cpu'
  if setting == 'auto':
    return ('onednn' if onednn.available() else 'xla') if cpu else 'off'
  if setting != 'off' and not cpu:
    raise ValueError(f"cpu_kernels={setting!r} runs on a CPU backend, not "
                     f"{jax.default_backend()}; use 'auto' or 'off'")
  if setting == 'onednn' and not onednn.available():
    raise ValueError(f"cpu_kernels='onednn' but {onednn.why_unavailable()}; run "
                     "`python -m preact.onednn.build` or use 'auto'")
  return setting


# Below this depth a CPU on oneDNN's kernels runs the unrolled net faster than the
# scanned one (preact-bench: 20-30% less time a step at depths 20 to 164), for about
# three times the compile time at 164 (10 s against 3.5 s). ResNet-1001 only compiles
# in seconds scanned; XLA's CPU formulations run slower unrolled; accelerators always
# scan.
SCAN_AUTO_DEPTH = 200


def scan_setting(setting: str, depth: int, cpu_kernels: str = 'auto') -> str:
  """'on' or 'off': what a config's ``model.scan`` means on this backend at ``depth``
  with the ``model.cpu_kernels`` setting."""
  if setting != 'auto':
    return setting
  try:
    kernels = cpu_kernel_set(cpu_kernels)
  except ValueError:
    return 'on'  # building the model reports the bad setting
  return 'off' if kernels == 'onednn' and depth < SCAN_AUTO_DEPTH else 'on'


def hardware(depth: int, remat: str = 'auto', cpu_kernels: str = 'auto',
             scan: str = 'auto') -> dict:
  """The ResNet settings the config leaves to the backend."""
  cpu = jax.default_backend() == 'cpu'
  kernels = cpu_kernel_set(cpu_kernels)
  scanned = scan_setting(scan, depth, kernels) == 'on'
  # Unrolled, XLA:CPU plans the same memory with remat as without (ResNet-20 and -56 at
  # batch 128: 0.19 and 0.53 GB either way): remat would only add the recomputation.
  auto_remat = cpu and scanned and depth >= REMAT_AUTO_DEPTH
  return dict(remat={'on': True, 'off': False}.get(remat, auto_remat),
              cpu_kernels=kernels, scan=scanned)


def from_config(config, num_classes: int) -> ResNet:
  """The network of a run's config; 'auto' settings resolved for this backend."""
  from preact import config as config_lib, paper, parallel
  from preact.errors import UserError
  m = config.model
  try:
    kwargs = dict(unit_args=config_lib.unit_args(m) or None, zero_init_last=m.zero_init_last,
                  dtype=jnp.dtype(m.dtype), shortcut=m.shortcut,
                  bn_axis_name=parallel.AXIS if config.bn_cross_replica else None,
                  **hardware(m.depth, m.remat, m.cpu_kernels, m.scan))
    block = paper.block(m.depth, m.arch) if m.block == 'auto' else m.block
    build = imagenet_resnet if m.arch == 'imagenet' else cifar_resnet
    return build(m.depth, m.unit, num_classes=num_classes, block=block, **kwargs)
  except ValueError as e:
    raise UserError(f'model: {e}') from None


# --------------------------------------------------------------------------------------
# Inspection helpers.


def init_key(seed: int) -> jax.Array:
  """The key models are initialized from. XLA's RngBitGenerator compiles the init of a
  deep net 2–3× faster than threefry; its streams may differ between backends."""
  return jax.random.key(seed, impl='rbg')


def init_shapes(model: ResNet, image_shape: Sequence[int]) -> dict:
  """Variables' shapes and dtypes without allocating them (``jax.eval_shape``)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def model_state(variables: dict) -> dict:
  """The variables a forward pass reads (params, BN statistics), without the probes'
  perturbations or sown intermediates."""
  return {k: variables[k] for k in ('params', 'batch_stats') if k in variables}


def count_params(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def size_and_flops(model: ResNet, image_shape: Sequence[int]) -> tuple[int, float]:
  """(parameter count, forward FLOPs per image in eval mode), FLOPs from XLA.

  XLA counts a while loop's body once, whatever its trip count, so a scanned net
  would be undercounted. Units within a stage are identical, so both numbers are
  affine in each stage's size: we lower unrolled nets with one unit per stage and
  with one more unit in each stage in turn, and extrapolate. This is exact, and spares
  lowering a 1001-layer unrolled net.
  """
  def measure(sizes):  # with XLA's own convs: FFI kernels' FLOPs are invisible to XLA
    return _measure(model.clone(stage_sizes=tuple(sizes), scan=False, remat=False,
                                cpu_kernels='off'), tuple(image_shape))

  ones = [1] * len(model.stage_sizes)
  base = measure(ones)
  total = base.copy()
  for s, n in enumerate(model.stage_sizes):
    if n > 1:
      total += (n - 1) * (measure(ones[:s] + [2] + ones[s + 1:]) - base)
  return int(total[0]), float(total[1])


@functools.lru_cache(maxsize=None)  # depths of one variant share their small nets
def _measure(model: ResNet, image_shape: tuple[int, ...]) -> np.ndarray:
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x)
  return np.array([count_params(variables['params']), lowered.cost_analysis()['flops']])


_REST = re.compile(r'^(stage\d+)_rest$')


def unscan(tree: dict) -> dict:
  """Turns a scanned variable tree into the unrolled net's layout (``stageS_unitJ``)."""
  out = {}
  for name, sub in tree.items():
    m = _REST.match(name)
    if m is None:
      out[name] = unscan(sub) if isinstance(sub, dict) else sub
      continue
    n = jax.tree.leaves(sub)[0].shape[0]
    for j in range(n):
      out[f'{m.group(1)}_unit{j + 2}'] = jax.tree.map(lambda a, j=j: a[j], sub)
  return out


def unit_blocks(tree: dict) -> dict[int, list[jax.Array]]:
  """Per-unit arrays (x_l, or ∂L/∂x_l) of each stage, in network order, as blocks with a
  leading unit axis: a stage's scanned units stay one stacked block.

  Accepts an 'intermediates' or 'perturbations' collection of either layout."""
  out: dict[int, list] = {}
  for name in sorted(tree, key=_unit_order):
    m = re.match(r'^stage(\d+)_(unit\d+|rest)$', name)
    if not m:
      continue
    value = tree[name]['x']
    if isinstance(value, tuple):  # sown values come as a tuple of calls
      value = value[0]
    out.setdefault(int(m.group(1)) - 1, []).append(value if m.group(2) == 'rest'
                                                   else value[None])
  return out


def unit_inputs(tree: dict) -> list[tuple[int, jax.Array]]:
  """Per-unit arrays in network order as (stage index, array)."""
  return [(s, block[i]) for s, blocks in unit_blocks(tree).items()
          for block in blocks for i in range(block.shape[0])]


def _unit_order(name: str):
  m = re.match(r'^stage(\d+)_(?:unit(\d+)|rest)$', name)
  if not m:
    return (1 << 30, 0)
  return (int(m.group(1)), int(m.group(2) or 2))
