"""Data parallelism: one per-replica function, mapped by jax.pmap or jax.shard_map.

The per-replica step reduces across replicas under the axis name ``batch`` (gradients
by pmean, BN statistics by pmean, metrics by pmean/psum), so its state outputs are
replicated. Both mappings then return the state as one global, replicated jax.Array
(pmap with out_axes=None), which is what orbax saves and what the next step takes.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'batch'


class Replicas:
  """All devices of all processes as one data-parallel axis."""

  def __init__(self, kind: str = 'pmap', devices=None):
    if kind not in ('pmap', 'shard_map'):
      raise ValueError(f'parallelism must be pmap or shard_map, got {kind!r}')
    self.kind = kind
    self.devices = list(devices or jax.devices())
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    self.count = len(self.devices)
    self.local_count = sum(d.process_index == jax.process_index() for d in self.devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))

  def map(self, fn: Callable, donate_state: bool = True) -> Callable:
    """fn(state, batch) per replica → a jitted (state, global batch) function."""
    donate = (0,) if donate_state else ()
    if self.kind == 'pmap':
      return jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0), out_axes=None,
                      donate_argnums=donate, devices=self.devices)
    # The step reduces across replicas itself (pmean/psum), as under pmap; with VMA
    # checks on, autodiff would also psum the gradients of replicated parameters.
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)

  def put_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of a global batch → a global array sharded over devices.

    pmap maps over a leading device axis, so its batches get one (devices, per, …)."""
    def put(x):
      if self.kind == 'pmap':
        x = x.reshape(self.local_count, -1, *x.shape[1:])
      return jax.make_array_from_process_local_data(self.sharded, x)
    return jax.tree.map(put, local)

  # With several processes, pmap's unmapped outputs are host-local arrays, which orbax
  # cannot save; saving goes through a global copy, and steps take host-local state.
  @property
  def _host_local(self) -> bool:
    return self.kind == 'pmap' and jax.process_count() > 1

  def for_step(self, tree):
    """A state as the mapped step takes it."""
    if not self._host_local:
      return tree
    return jax.tree.map(lambda x: x.addressable_data(0), tree)

  def for_save(self, tree):
    """A state as orbax saves it: global, replicated arrays."""
    if not self._host_local:
      return tree
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)

  def check_batch(self, name: str, size: int):
    from preact.errors import UserError
    if size % self.count:
      raise UserError(f'{name} {size} is not divisible by the {self.count} devices; '
                      f'use a multiple of {self.count}')
