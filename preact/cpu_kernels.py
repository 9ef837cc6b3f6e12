"""XLA:CPU formulations of the convolutions and the batch norm: the same math as XLA's
and Flax's (tests compare values and gradients), spelled so that XLA:CPU runs it fast.
A model on a CPU backend takes them (``model.cpu_kernels``); GPUs and TPUs never do.

They are injected: :func:`conv` as ``preact.layers.Conv``'s ``op`` and
:class:`BatchNorm` in place of ``nn.BatchNorm``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from preact.layers import Initializer, xla_conv as _conv


def conv(x, kernel, strides, padding):
  """``preact.layers.Conv``'s op: 1×1 convs as a matmul over channels, k×k convs with
  canonical-layout gradients."""
  if kernel.shape[:2] == (1, 1):
    return pointwise(x[:, ::strides[0], ::strides[1]], kernel[0, 0])
  return conv_canonical_grads(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_canonical_grads(x, kernel, strides, padding):
  """An NHWC convolution whose gradients are themselves plain NHWC/HWIO convolutions.

  Inside a scanned (while-loop) body XLA:CPU leaves autodiff's gradient convolutions in
  their transposed dimension orders and runs them on a slow generic path: the scanned
  backward pass was 17× slower than the unrolled one. Spelling the gradients out with
  canonical dimension orders, as XLA's layout passes do for unrolled code, gives the
  same numbers at the unrolled speed (tests compare both against autodiff).
  """
  return _conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  k = kernel.shape[:2]
  # dx: a stride-1 conv of the stride-dilated dy with the flipped, io-swapped kernel.
  pad_dx = []
  for d in range(2):
    before = k[d] - 1 - padding[d][0]
    dilated = (dy.shape[1 + d] - 1) * strides[d] + 1
    pad_dx.append((before, x.shape[1 + d] + k[d] - 1 - dilated - before))
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(dy, flipped, (1, 1), pad_dx, lhs_dilation=strides)
  # dW: channels-in as the batch, the batch as features, dy (dilated) as the kernel.
  dw = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), padding,
             rhs_dilation=strides)
  return dx, dw[:, :k[0], :k[1], :].transpose(1, 2, 0, 3)


conv_canonical_grads.defvjp(_conv_fwd, _conv_bwd)


@jax.custom_vjp
def pointwise(x, w):
  """A 1×1 convolution as a matmul over the channel axis (NHWC x, (C, D) w).

  Autodiff's weight gradient contracts x and dy over three axes at once, which XLA:CPU
  runs as a transpose of x and a slow dot (20+ ms at ResNet-164's first-stage shapes);
  the same sum as one 2-D matmul of the flattened arrays runs 3-4× faster.
  """
  return jnp.einsum('nhwc,cd->nhwd', x, w)


def _pointwise_fwd(x, w):
  return pointwise(x, w), (x, w)


def _pointwise_bwd(residuals, dy):
  x, w = residuals
  dx = jnp.einsum('nhwd,cd->nhwc', dy, w)
  dw = jnp.dot(x.reshape(-1, w.shape[0]).T, dy.reshape(-1, w.shape[1]))
  return dx, dw


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` over NHWC (same variables, statistics and output) whose training
  pass has a hand-written backward: two per-channel reductions and one elementwise
  pass, where XLA:CPU runs autodiff's version of the same sum as about seven passes
  over the activations. Evaluation is the plain formula. Chosen on CPU only.
  """
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str | None = None
  use_running_average: bool | None = None
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros
  # A ReLU of the output, inside the module so that kernels can fuse it with the norm
  # (oneDNN's fuse_norm_relu) and skip a pass over the activations each way.
  relu: bool = False
  # The training and inference passes: this file's functions below, or the same in other
  # kernels (preact.onednn). (x, scale, bias, epsilon, axis_name, relu) → (y, mean, var)
  # and (x, mean, var, scale, bias, epsilon, relu) → y.
  train_op: Callable[..., tuple] = None
  infer_op: Callable[..., jax.Array] = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    c = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, c, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, c, jnp.float32)
    scale = self.param('scale', self.scale_init, c, self.param_dtype)
    bias = self.param('bias', self.bias_init, c, self.param_dtype)
    if use_running_average:
      y = (self.infer_op or batch_norm_inference)(x, ra_mean.value, ra_var.value, scale,
                                                  bias, self.epsilon, self.relu)
    else:
      # As in Flax, initialization neither syncs replicas nor updates the averages.
      initializing = self.is_initializing()
      y, mean, var = (self.train_op or batch_norm_train)(
          x, scale, bias, self.epsilon, None if initializing else self.axis_name, self.relu)
      if not initializing:
        # The statistics leave through the running averages only: their gradient is
        # taken to be zero (nothing in a loss depends on batch_stats).
        mean, var = jax.lax.stop_gradient((mean, var))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype or jnp.result_type(x, scale, bias))


def _normalize(x, mean, var, scale, bias, epsilon):
  """Flax's normalization, op for op: (x - mean) · (rsqrt(var + eps) · scale) + bias."""
  return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def batch_norm_inference(x, mean, var, scale, bias, epsilon, relu=False):
  """Batch norm with given statistics [then a ReLU]."""
  y = _normalize(x, mean, var, scale, bias, epsilon)
  return jax.nn.relu(y) if relu else y


def batch_norm_train(x, scale, bias, epsilon, axis_name=None, relu=False):
  """Training-mode batch norm of NHWC ``x`` [then a ReLU of its output]: (output, batch
  mean, batch variance)."""
  y, mu, var = _batch_norm_train(x, scale, bias, epsilon, axis_name)
  return (jax.nn.relu(y) if relu else y), mu, var


def _batch_stats(x, axis_name):
  """Flax's fast-variance statistics in float32: E[x], max(0, E[x²] − E[x]²)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mu, mu2 = x.mean((0, 1, 2)), jax.lax.square(x).mean((0, 1, 2))
  if axis_name is not None:
    mu, mu2 = jax.lax.pmean(jnp.stack([mu, mu2]), axis_name)
  return mu, mu2 - jax.lax.square(mu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, axis_name):
  mu, raw_var = _batch_stats(x, axis_name)
  var = jnp.maximum(0.0, raw_var)
  return _normalize(x, mu, var, scale, bias, epsilon), mu, var


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
  y, mu, var = _batch_norm_train(x, scale, bias, epsilon, axis_name)
  # A variance clipped to 0 is a constant: its channels get no gradient through it.
  return (y, mu, var), (x, scale, mu, jax.lax.rsqrt(var + epsilon), var > 0)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
  x, scale, mu, rstd, var_used = residuals
  g = cotangents[0]  # the statistics' cotangents are zero (see BatchNorm)
  xhat = (x - mu) * rstd
  dbias, dscale = g.sum((0, 1, 2)), (g * xhat).sum((0, 1, 2))
  n = x.shape[0] * x.shape[1] * x.shape[2]
  mean_g, mean_gx = dbias / n, dscale / n
  if axis_name is not None:  # statistics over all replicas: so are their gradients
    mean_g, mean_gx = jax.lax.pmean(jnp.stack([mean_g, mean_gx]), axis_name)
  # ∂/∂x of (x − μ)·rstd with μ and var of the whole batch.
  dx = (scale * rstd) * (g - mean_g - xhat * jnp.where(var_used, mean_gx, 0.0))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
