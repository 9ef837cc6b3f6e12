"""Layers injected into the units as partials: the convolution with the authors' padding,
and their initializers. (Batch norm is Flax's, or :mod:`preact.cpu_kernels`' on a CPU.)"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# N(0, sqrt(2 / (k·k·out_channels))): the authors' ConvInit (fan-out He init, untruncated).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Torch's nn.Linear default, U(±1/sqrt(fan_in)); the authors zero its bias.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


_DN = ('NHWC', 'HWIO', 'NHWC')


def xla_conv(x, kernel, strides, padding, **kw):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN, **kw)


class Conv(nn.Module):
  """A 2-D NHWC convolution with Torch's symmetric k//2 padding.

  Flax's 'SAME' pads a strided 3×3 conv as (0, 1) where the authors' Torch code pads
  (1, 1); the two sample different pixels, so we pad as they did. Parameters are laid
  out exactly like ``nn.Conv`` ('kernel' HWIO, optional 'bias').
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = he_normal_fan_out
  bias_init: Initializer = nn.initializers.zeros
  # (x, kernel, strides, padding) → y: XLA's convolution, or the same math in other
  # kernels (preact.cpu_kernels.conv), chosen per backend by the model.
  op: Callable[..., jax.Array] = xla_conv
  # (x, kernel, strides, padding, addend) → op(...) + addend in one pass over the output,
  # where the kernels have such an op (preact.onednn.conv_add); else the two in turn.
  add_op: Callable[..., jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, addend: jax.Array | None = None) -> jax.Array:
    """The convolution of ``x`` [plus ``addend``, e.g. a residual unit's shortcut]."""
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if addend is not None and self.add_op is not None and not self.use_bias:
      return self.add_op(x, kernel, tuple(self.strides), padding, addend)
    y = self.op(x, kernel, tuple(self.strides), padding)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y if addend is None else y + addend
