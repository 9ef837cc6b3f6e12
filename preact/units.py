"""Residual units of "Identity Mappings in Deep Residual Networks" (He et al., 2016).

A unit computes x_{l+1} = f(h(x_l) + F(x_l)). The paper varies two things, and so
does this file:

* where BN and ReLU sit around the convolutions of F and after the addition f
  (paper Fig. 4, :data:`PLACEMENTS`), and
* what the shortcut h does (paper Fig. 2, the ``Shortcut`` modules below).

A registered variant (:data:`UNITS`) is one placement plus one shortcut. Between two
convolutions of a branch there is always BN-ReLU, so a placement is fully described
by what comes before the first convolution, after the last one, and after the
addition.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
Array = jax.Array


# --------------------------------------------------------------------------------------
# Activation placements (paper Fig. 4).


@dataclasses.dataclass(frozen=True)
class Placement:
  """BN/ReLU around a residual branch: before its first conv, after its last, after +."""
  before: tuple[str, ...]
  after_branch: tuple[str, ...]
  after_add: tuple[str, ...]

  @property
  def raw_output(self) -> bool:
    """Whether the addition is the unit's last op (so the head must normalize)."""
    return not self.after_add

  @property
  def normalized_branch(self) -> bool:
    """Whether F ends in BN: then a projection shortcut gets a BN too (fb.resnet.torch
    shortcut type B), so both summands reach the addition on the same scale."""
    return 'bn' in self.after_branch


PLACEMENTS: dict[str, Placement] = {
    #                                   before           after F          after +
    'original':             Placement((),              ('bn',),         ('relu',)),
    'bn_after_addition':    Placement((),              (),              ('bn', 'relu')),
    'relu_before_addition': Placement((),              ('bn', 'relu'),  ()),
    'relu_only_preact':     Placement(('relu',),       ('bn',),         ()),
    'full_preact':          Placement(('bn', 'relu'),  (),              ()),
}


# --------------------------------------------------------------------------------------
# Shortcuts (paper Fig. 2). Each combines the unit input x, the shortcut signal h
# (x itself, or its projection when the shape changes) and the branch output F.


class Shortcut(nn.Module):
  """Fig. 2(a), the identity: x_{l+1} = h + F. Subclasses change the combination.
  (Where F ends in a conv, the unit has that conv add h instead: UnitDef.plain_sum.)"""
  conv: ModuleDef = nn.Conv  # injected by the unit, for shortcuts with parameters

  @nn.compact
  def __call__(self, x: Array, h: Array, f: Array, train: bool) -> Array:
    return h + f


class ConstantScaling(Shortcut):
  """Fig. 2(b): λ·h + β·F. The paper's rows are λ=0.5 with β=1 ("0.5/1") and β=0.5."""
  scale: float = 0.5
  branch_scale: float = 0.5

  @nn.compact
  def __call__(self, x, h, f, train):
    return self.scale * h + self.branch_scale * f


class Gating(Shortcut):
  """Fig. 2(c, d): h gated by 1 − g(x), g(x) = σ(W_g x + b_g) with W_g a 1×1 conv.

  A very negative b_g starts the gate near 0, i.e. close to an identity shortcut,
  which is why the paper needs b_g ≈ −6 to train ResNet-110 with it.
  """
  bias: float = -6.0
  exclusive: bool = True  # Fig. 2(c) also gates F by g; Fig. 2(d) leaves F alone.

  @nn.compact
  def __call__(self, x, h, f, train):
    stride = x.shape[1] // f.shape[1]
    g = nn.sigmoid(self.conv(f.shape[-1], (1, 1), (stride, stride), use_bias=True,
                             bias_init=nn.initializers.constant(self.bias),
                             name='gate')(x))
    return (1 - g) * h + (g * f if self.exclusive else f)


class DropoutShortcut(Shortcut):
  """Fig. 2(f): dropout on h. Not rescaled by 1/(1−rate): the paper reads it as a
  stochastic λ whose expectation is 1 − rate, and evaluation uses that expectation."""
  rate: float = 0.5

  def __post_init__(self):
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'dropout rate must be in [0, 1), got {self.rate}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, h, f, train):
    keep = 1.0 - self.rate
    if not train:
      return keep * h + f
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, h.shape)
    return jnp.where(mask, h, 0).astype(h.dtype) + f


# --------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class UnitDef:
  """A named unit variant: a placement and a shortcut (a Shortcut class, or a partial
  of one that fixes some of its fields). The shortcut's other fields are the variant's
  parameters, settable per run as ``model.unit_args``."""
  placement: str
  shortcut: Callable[..., Shortcut] = Shortcut
  project_always: bool = False  # Fig. 2(e): a 1×1 conv shortcut on every unit.

  @property
  def layout(self) -> Placement:
    return PLACEMENTS[self.placement]

  @property
  def params(self) -> dict[str, Any]:
    """The shortcut's parameters and their defaults: its own dataclass fields, less
    those its partial fixes."""
    fixed = getattr(self.shortcut, 'keywords', {})
    cls = getattr(self.shortcut, 'func', self.shortcut)
    inherited = {f.name for f in dataclasses.fields(Shortcut)}
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in inherited and f.name not in fixed}

  @property
  def identity_shortcut(self) -> bool:
    """Fig. 4's variants (h = identity) as opposed to Fig. 2's."""
    return self.shortcut is Shortcut and not self.project_always

  @property
  def plain_sum(self) -> bool:
    """Whether x_{l+1} = h + F with F ending in its last conv: that conv may then add h
    as it writes F (one pass over x_{l+1} instead of two, where the kernels can)."""
    return self.shortcut is Shortcut and not self.layout.after_branch

  def resolve(self, args: dict | None = None) -> Callable[..., Shortcut]:
    """The shortcut with ``args`` bound over its defaults, checked by building it."""
    args = dict(args or {})
    unknown = set(args) - set(self.params)
    if unknown:
      raise ValueError(f'no argument(s) {", ".join(sorted(unknown))}; '
                       f'valid: {", ".join(self.params) or "none"}')
    for key, value in args.items():
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f'unit argument {key} must be a number, got {value!r}')
    self.shortcut(**args)  # the shortcut's own checks (e.g. a dropout rate in [0, 1))
    return functools.partial(self.shortcut, **args)


UNITS: dict[str, UnitDef] = {
    # Fig. 4, activation placements, identity shortcut.
    **{name: UnitDef(name) for name in PLACEMENTS},
    # Fig. 2, shortcut variants on the original unit.
    'constant_scaling': UnitDef('original', ConstantScaling),
    'exclusive_gating': UnitDef('original', functools.partial(Gating, exclusive=True)),
    'shortcut_only_gating': UnitDef('original', functools.partial(Gating, exclusive=False)),
    'conv_shortcut': UnitDef('original', project_always=True),
    'dropout_shortcut': UnitDef('original', DropoutShortcut),
}


def get_unit(name: str, args: dict | None = None) -> tuple[UnitDef, Callable[..., Shortcut]]:
  """Looks up a unit variant and binds its arguments: (definition, shortcut)."""
  if name not in UNITS:
    raise ValueError(f'unknown unit {name!r}; valid units: {", ".join(UNITS)}')
  try:
    return UNITS[name], UNITS[name].resolve(args)
  except ValueError as e:
    raise ValueError(f'unit {name!r}: {e}') from None


def unit_params() -> dict[str, Any]:
  """Every parameter of every registered unit, with its first default (the config's
  ``model.unit_args`` keys)."""
  out = {}
  for unit in UNITS.values():
    for key, value in unit.params.items():
      out.setdefault(key, value)
  return out


# Blocks, the shapes of F: kernel sizes and the width of each conv relative to the
# unit's output. The stride sits on the first conv, as in the authors' resnet-pre-act.lua.
BLOCKS: dict[str, tuple[tuple[int, int], ...]] = {
    'basic': ((3, 1), (3, 1)),                  # two 3×3
    'bottleneck': ((1, 4), (3, 4), (1, 1)),     # 1×1 (out/4), 3×3 (out/4), 1×1 (out)
    'one_layer': ((3, 1),),                     # Table 3's "1-layer skip"
}


SHORTCUTS = ('projection', 'zero_pad')


def zero_pad(x: Array, features: int, stride: int) -> Array:
  """Option A of He et al. (CVPR 2016) for a unit that changes shape: subsample by the
  stride and fill the new channels with zeros, without parameters (fb.resnet.torch's
  shortcut type A: a strided 1×1 average pool, then concatenated zeros)."""
  x = x[:, ::stride, ::stride, :]
  if features < x.shape[-1]:
    raise ValueError(f'a zero-padded shortcut cannot shrink {x.shape[-1]} channels to '
                     f'{features}')
  return jnp.pad(x, ((0, 0),) * 3 + ((0, features - x.shape[-1]),))


def bn_relu(norm: ModuleDef, norm_relu: ModuleDef | None, x: Array, train: bool,
            **kw) -> Array:
  """BN, then ReLU: one module where the kernels fuse the two (``norm_relu``), else
  ``norm`` and ``nn.relu``. Either way the norm is named as ``norm`` would be."""
  if norm_relu is not None:
    return norm_relu(**kw)(x, use_running_average=not train)
  return nn.relu(norm(**kw)(x, use_running_average=not train))


class ResidualUnit(nn.Module):
  """One residual unit x_{l+1} = f(h(x_l) + F(x_l)) of any registered variant.

  ``unit`` and ``combine`` are what :func:`get_unit` returns for the variant: its
  definition and its Fig. 2 shortcut with the run's arguments bound."""
  unit: UnitDef
  combine: Callable[..., Shortcut]
  features: int
  block: str = 'basic'
  strides: int = 1
  # The first unit of a stage splits into branch and shortcut after its pre-activation
  # (paper appendix: "these projection shortcuts are also with pre-activation";
  # 'both_preact' in fb.resnet.torch's preresnet.lua); the other units add the raw x_l.
  first: bool = False
  # x is already activated: the unit right after conv1, whose first activation is the
  # stem's BN-ReLU (paper appendix: "right after conv1 and before splitting").
  activated_input: bool = False
  # How a unit that changes shape shapes its shortcut: a 1×1 conv, or option A.
  shortcut: str = 'projection'
  zero_init_last: bool = False
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  norm_relu: ModuleDef | None = None  # see bn_relu

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    unit = self.unit
    p = unit.layout
    # x_l is the point the probes differentiate at: ∂L/∂x_l is the gradient of this
    # zero perturbation, and the forward value is sown for ‖x_l‖.
    x = self.perturb('x', x)
    self.sow('intermediates', 'x', x)

    def ops(names, y, last=False):
      names = list(names)
      while names:
        op = names.pop(0)
        if op == 'bn':
          # Zeroing the branch's last BN scale makes F ≡ 0 at init (Goyal et al.).
          zero = last and self.zero_init_last
          init = {'scale_init': nn.initializers.zeros} if zero else {}
          if names[:1] == ['relu']:
            y = bn_relu(self.norm, self.norm_relu, y, train, **init)
            names.pop(0)
          else:
            y = self.norm(**init)(y, use_running_average=not train)
        else:
          y = nn.relu(y)
      return y

    y = x if self.activated_input else ops(p.before, x)
    h = y if self.first else x
    reshape = self.strides != 1 or x.shape[-1] != self.features
    if unit.project_always or (reshape and self.shortcut == 'projection'):
      h = self.conv(self.features, (1, 1), (self.strides,) * 2, name='proj')(h)
      if p.normalized_branch:
        h = self.norm(name='proj_bn')(h, use_running_average=not train)
    elif reshape:
      h = zero_pad(h, self.features, self.strides)
    convs = BLOCKS[self.block]
    for i, (k, div) in enumerate(convs):
      if i:
        y = ops(('bn', 'relu'), y)
      last = i == len(convs) - 1
      zero = self.zero_init_last and last and not p.normalized_branch
      init = {'kernel_init': nn.initializers.zeros} if zero else {}
      y = self.conv(self.features // div, (k, k), (self.strides if i == 0 else 1,) * 2,
                    **init)(y, addend=h if unit.plain_sum and last else None)
    if unit.plain_sum:  # the last conv has added h: y is h + F
      return ops(p.after_add, y)
    y = ops(p.after_branch, y, last=True)
    out = self.combine(conv=self.conv, name='shortcut')(x, h, y, train)
    return ops(p.after_add, out)
