"""oneDNN kernels for the CPU backend, called through JAX's FFI.

Drop-in replacements for :mod:`preact.cpu_kernels`' formulations, running oneDNN's
convolution and batch-norm primitives (``onednn_ffi.cc``) on NHWC activations and HWIO
kernels, float32 and bfloat16:

- :func:`conv` (x, kernel, strides, padding): ``preact.layers.Conv``'s ``op``, the same
  contract as ``preact.layers.xla_conv`` / ``preact.cpu_kernels.conv``; :func:`conv_add`
  (..., addend), its ``add_op``: the convolution plus a residual in one pass.
- :func:`batch_norm_train` (x, scale, bias, epsilon, axis_name, relu) and
  :func:`batch_norm_inference` (x, mean, var, scale, bias, epsilon, relu): the contracts
  of ``preact.cpu_kernels``' functions of the same names, a ReLU of the output fused in
  oneDNN (``relu=True``).

``preact.cpu_kernels.BatchNorm(train_op=batch_norm_train, infer_op=batch_norm_inference)``
is Flax's batch norm running here.

Each is differentiable (``jax.custom_vjp``; the backward passes are oneDNN primitives too)
and works under ``jit``, ``grad``, ``scan``, ``checkpoint``, ``vmap`` (sequentially) and
``shard_map``/``pmap`` (each device runs its own shard). Whatever oneDNN is not given
falls back to the XLA formulation: anything but float32/bfloat16 rank-4 operands, string
or negative padding, dilations, grouped convs, and batch statistics across replicas
(``axis_name`` not None).

The library is built by ``python -m preact.onednn.build``; without it (or without
libdnnl) :func:`available` is False and every function here is the XLA formulation.
Setting ``PREACT_ONEDNN=0`` in the environment disables it too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = pathlib.Path(__file__).resolve().parent / '_onednn_ffi.so'

# FFI target name → symbol in the library.
_TARGETS = {
    'preact_onednn_conv_fwd': 'PreactOnednnConvFwd',
    'preact_onednn_conv_fwd_add': 'PreactOnednnConvFwdAdd',
    'preact_onednn_conv_bwd_data': 'PreactOnednnConvBwdData',
    'preact_onednn_conv_bwd_weights': 'PreactOnednnConvBwdWeights',
    'preact_onednn_bn_fwd_train': 'PreactOnednnBnFwdTrain',
    'preact_onednn_bn_bwd': 'PreactOnednnBnBwd',
    'preact_onednn_bn_fwd_infer': 'PreactOnednnBnFwdInfer',
}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_VMAP = 'sequential'

_lock = threading.Lock()
_lib: Any = None  # None: not tried yet; False: unavailable; else the ctypes library
_why = 'not loaded yet'


def available() -> bool:
  """Whether the library is built and loads (its FFI targets are registered, once)."""
  global _lib, _why
  if _lib is None:
    with _lock:
      if _lib is None:
        _lib, _why = _load()
  return _lib is not False


def why_unavailable() -> str:
  """A line saying why :func:`available` is False ('' when it is True)."""
  return '' if available() else _why


def _load():
  if os.environ.get('PREACT_ONEDNN', '1').lower() in ('0', 'false', 'no', 'off'):
    return False, 'disabled by PREACT_ONEDNN'
  if not LIBRARY.exists():
    return False, f'{LIBRARY.name} not built (python -m preact.onednn.build)'
  try:
    lib = ctypes.CDLL(str(LIBRARY))
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except (OSError, AttributeError) as e:  # e.g. libdnnl.so.2 missing, a stale build
    return False, f'{LIBRARY.name} does not load: {e}'
  i64 = ctypes.c_int64
  lib.preact_onednn_bn_workspace_bytes.restype = i64
  lib.preact_onednn_bn_workspace_bytes.argtypes = [i64, i64, i64, i64, ctypes.c_int32]
  return lib, ''


# ---------------------------------------------------------------- convolution ----

def conv(x, kernel, strides, padding):
  """``preact.layers.Conv``'s op: NHWC x, HWIO kernel, ((lo, hi), (lo, hi)) padding."""
  plan = _conv_plan(x, kernel, strides, padding)
  if plan is None:
    from preact.layers import xla_conv
    return xla_conv(x, kernel, strides, padding)
  return _conv(*_match_varying(x, kernel), *plan)


def _conv_plan(x, kernel, strides, padding):
  """(strides, padding) as hashable int tuples when oneDNN takes the conv, else None."""
  if not available() or isinstance(padding, str):
    return None
  if jnp.ndim(x) != 4 or jnp.ndim(kernel) != 4:
    return None
  if jnp.dtype(x.dtype) not in _DTYPES or jnp.dtype(kernel.dtype) != jnp.dtype(x.dtype):
    return None
  try:
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    return None
  if len(strides) != 2 or len(padding) != 2 or min(strides) < 1:
    return None
  if min(p for pair in padding for p in pair) < 0 or x.shape[3] != kernel.shape[2]:
    return None
  if min(x.shape) < 1 or min(kernel.shape) < 1 or min(_conv_out(x.shape, kernel.shape,
                                                                  strides, padding)) < 1:
    return None
  return strides, padding


def _conv_out(xs, ks, strides, padding):
  return (xs[0],) + tuple((xs[1 + d] + sum(padding[d]) - ks[d]) // strides[d] + 1
                          for d in range(2)) + (ks[3],)


def _conv_attrs(strides, padding):
  return dict(strides=np.asarray(strides, np.int64),
              pad_lo=np.asarray([p[0] for p in padding], np.int64),
              pad_hi=np.asarray([p[1] for p in padding], np.int64))


def _ffi(name, out, *args, **attrs):
  """An FFI call whose results vary over the same shard_map axes as its operands (which
  :func:`_match_varying` has made equal)."""
  mat = _mat(args[0])
  if mat is not None and mat.varying:
    mesh = jax.typeof(args[0]).sharding.mesh
    out = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, manual_axis_type=mat,
            sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())), out)
  return jax.ffi.ffi_call(name, out, vmap_method=_VMAP)(*args, **attrs)


def _mat(a):
  """The manual-axis type of a value inside shard_map (jax ≥ 0.9), or None."""
  return getattr(jax.typeof(a), 'mat', None)


def _match_varying(*args):
  """Inside ``shard_map``: the operands cast to vary over the union of the manual axes
  any of them varies over (an FFI call needs them equal; autodiff then sums the gradient
  of a replicated operand, e.g. the kernel, over the devices). Outside: unchanged."""
  mats = [_mat(a) for a in args]
  if any(m is None for m in mats):
    return args
  axes = frozenset().union(*(m.varying for m in mats))
  if not axes:
    return args
  return tuple(a if m.varying == axes else
               jax.lax.pcast(a, tuple(sorted(axes - m.varying, key=str)), to='varying')
               for a, m in zip(args, mats))


def conv_add(x, kernel, strides, padding, addend):
  """``conv(x, kernel, strides, padding) + addend``, in bfloat16 as one pass: oneDNN adds
  ``addend`` (the output's shape) to the convolution's float32 accumulator before it
  writes the output, which then is rounded once, not twice.

  In float32 it is the two in turn: oneDNN 2.6 has the fused sum only in its older jit
  kernels, not the brgemm ones it otherwise picks, and in float32 those lose what the
  fusion saves (ResNet-164's 1×1 and ResNet-20's 3×3 convs, ``docs/performance.md``).
  """
  plan = _conv_plan(x, kernel, strides, padding)
  if plan is None or jnp.dtype(x.dtype) != jnp.dtype(jnp.bfloat16) or \
      jnp.dtype(addend.dtype) != jnp.dtype(x.dtype) or \
      addend.shape != _conv_out(x.shape, kernel.shape, *plan):
    return conv(x, kernel, strides, padding) + addend
  return _conv_add(*_match_varying(x, kernel, addend), *plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_add(x, kernel, addend, strides, padding):
  return _ffi('preact_onednn_conv_fwd_add', jax.ShapeDtypeStruct(addend.shape, x.dtype),
              x, kernel, addend, **_conv_attrs(strides, padding))


def _conv_add_fwd(x, kernel, addend, strides, padding):
  return _conv_add(x, kernel, addend, strides, padding), (x, kernel)


def _conv_add_bwd(strides, padding, residuals, dy):
  return (*_conv_bwd(strides, padding, residuals, dy), dy)


_conv_add.defvjp(_conv_add_fwd, _conv_add_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  out = jax.ShapeDtypeStruct(_conv_out(x.shape, kernel.shape, strides, padding), x.dtype)
  return _ffi('preact_onednn_conv_fwd', out, x, kernel, **_conv_attrs(strides, padding))


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  attrs = _conv_attrs(strides, padding)
  dx = _ffi('preact_onednn_conv_bwd_data', jax.ShapeDtypeStruct(x.shape, x.dtype),
            dy, kernel, **attrs)
  dw = _ffi('preact_onednn_conv_bwd_weights', jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
            x, dy, **attrs)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


# ----------------------------------------------------------------- batch norm ----

def batch_norm_train(x, scale, bias, epsilon, axis_name=None, relu=False):
  """Training-mode batch norm of NHWC ``x`` [then a ReLU]: (output, batch mean, batch
  variance), as ``preact.cpu_kernels.batch_norm_train`` (the statistics' cotangents are
  taken as zero; with ``axis_name`` the statistics span replicas, which only the XLA
  version does)."""
  if axis_name is not None or not _bn_ok(x, scale, bias):
    from preact import cpu_kernels
    return cpu_kernels.batch_norm_train(x, scale, bias, epsilon, axis_name, relu)
  y, mean, var = _bn_train(*_match_varying(x, scale.astype(jnp.float32),
                                           bias.astype(jnp.float32)), float(epsilon),
                           bool(relu))
  return y.astype(jnp.result_type(x, scale, bias)), mean, var


def batch_norm_inference(x, mean, var, scale, bias, epsilon, relu=False):
  """(x − mean) · rsqrt(var + ε) · scale + bias [then ReLU] with given statistics.
  Differentiable (its gradient is XLA's, of the same formula)."""
  if not _bn_ok(x, scale, bias, mean, var):
    from preact import cpu_kernels
    return cpu_kernels.batch_norm_inference(x, mean, var, scale, bias, epsilon, relu)
  f32 = lambda a: a.astype(jnp.float32)
  y = _bn_infer(*_match_varying(x, f32(mean), f32(var), f32(scale), f32(bias)),
                float(epsilon), bool(relu))
  return y.astype(jnp.result_type(x, mean, var, scale, bias))


def _bn_ok(x, *channel_arrays):
  if not available() or jnp.ndim(x) != 4 or jnp.dtype(x.dtype) not in _DTYPES:
    return False
  if min(x.shape) < 1:
    return False
  return all(jnp.shape(a) == (x.shape[3],) and jnp.issubdtype(a.dtype, jnp.floating)
             for a in channel_arrays)


@functools.lru_cache(maxsize=None)
def _workspace_bytes(shape, dtype) -> int:
  n = _lib.preact_onednn_bn_workspace_bytes(*shape, int(jnp.dtype(dtype) == jnp.bfloat16))
  if n < 0:
    raise RuntimeError(f'oneDNN cannot fuse batch norm and ReLU for {shape} {dtype}')
  return max(int(n), 1)


def _bn_fwd_call(x, scale, bias, epsilon, relu):
  c = (x.shape[3],)
  ws = _workspace_bytes(tuple(x.shape), x.dtype) if relu else 1
  out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(c, jnp.float32),
         jax.ShapeDtypeStruct(c, jnp.float32), jax.ShapeDtypeStruct((ws,), jnp.uint8))
  return _ffi('preact_onednn_bn_fwd_train', out, x, scale, bias,
              epsilon=np.float32(epsilon), relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_train(x, scale, bias, epsilon, relu):
  y, mean, var, _ = _bn_fwd_call(x, scale, bias, epsilon, relu)
  return y, mean, var


def _bn_train_fwd(x, scale, bias, epsilon, relu):
  y, mean, var, ws = _bn_fwd_call(x, scale, bias, epsilon, relu)
  return (y, mean, var), (x, scale, bias, mean, var, ws)


def _bn_train_bwd(epsilon, relu, residuals, cotangents):
  x, scale, bias, mean, var, ws = residuals
  g = cotangents[0].astype(x.dtype)  # the statistics' cotangents are taken as zero
  c = (x.shape[3],)
  out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(c, jnp.float32),
         jax.ShapeDtypeStruct(c, jnp.float32))
  dx, dscale, dbias = _ffi('preact_onednn_bn_bwd', out, x, g, mean, var, scale, bias, ws,
                           epsilon=np.float32(epsilon), relu=np.int64(relu))
  return dx, dscale, dbias


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def _bn_infer_reference(x, mean, var, scale, bias, epsilon, relu):
  from preact import cpu_kernels
  return cpu_kernels.batch_norm_inference(x, mean, var, scale, bias, epsilon,
                                          relu).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _bn_infer(x, mean, var, scale, bias, epsilon, relu):
  return _ffi('preact_onednn_bn_fwd_infer', jax.ShapeDtypeStruct(x.shape, x.dtype),
              x, mean, var, scale, bias, epsilon=np.float32(epsilon), relu=np.int64(relu))


def _bn_infer_fwd(x, mean, var, scale, bias, epsilon, relu):
  return _bn_infer(x, mean, var, scale, bias, epsilon, relu), (x, mean, var, scale, bias)


def _bn_infer_bwd(epsilon, relu, residuals, g):
  _, vjp = jax.vjp(lambda *a: _bn_infer_reference(*a, epsilon, relu), *residuals)
  return vjp(g)


_bn_infer.defvjp(_bn_infer_fwd, _bn_infer_bwd)
