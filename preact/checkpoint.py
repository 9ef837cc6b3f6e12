"""Checkpoints: an orbax CheckpointManager over the training state, saved as plain
nested dicts so any device count can restore them.

Orbax writes each step into a temporary directory and renames it only once complete
(commit_success.txt), so a process killed mid-save leaves nothing that a later
restore would read; the manager ignores the unfinished directory.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from preact.errors import UserError


def absolute(path) -> str:
  path = str(path)
  return path if '://' in path else os.path.abspath(path)


def _saved_form(state) -> dict:
  """The state as saved: nested dicts, without the fields that are None (float16's loss
  scale in other runs), so a checkpoint written before such a field existed restores."""
  return {k: v for k, v in serialization.to_state_dict(state).items() if v is not None}


class Checkpoints:
  """Saves and restores {'state': train state, 'meta': JSON} under workdir/checkpoints."""

  # Saves are synchronous: a failed write (a full disk) then surfaces at the step that
  # made it, and orbax 0.12.8's asynchronous saves lost a step's temporary directory when
  # two saves followed each other closely (tests/test_faults.py saves every step). A
  # ResNet's state takes well under a second to write.
  def __init__(self, workdir, keep: int = 3, asynchronous: bool = False):
    # orbax wants absolute paths; a relative local workdir is relative to the cwd.
    self.directory = epath.Path(absolute(workdir)) / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=asynchronous),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_saved_form(state)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, state_like, step: int | None = None, sharding=None):
    """Restores into the structure of ``state_like`` (arrays or ShapeDtypeStructs),
    placed with ``sharding`` (default: that of ``state_like``'s leaves)."""
    step = self.latest() if step is None else step
    if step is None or step not in self.steps():
      have = ', '.join(map(str, self.steps())) or 'none'
      raise UserError(f'no checkpoint for step {step} in {self.directory} (have: {have})')
    target = _saved_form(state_like)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=sharding or getattr(x, 'sharding', None)),
        target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise many kinds
      first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
      raise UserError(f'checkpoint {self.directory / str(step)} cannot be restored '
                      f'({first}); move that directory aside to resume from an earlier '
                      'checkpoint, or train in a new --workdir') from None
    absent = {k: None for k in serialization.to_state_dict(state_like)}
    return serialization.from_state_dict(state_like, {**absent, **restored.state}), \
        restored.meta

  def restore_arrays(self, step: int | None = None) -> dict:
    """The saved state as nested dicts of numpy arrays, whatever topology saved it."""
    step = self.latest() if step is None else step
    if step is None:
      raise UserError(f'no checkpoint in {self.directory}')
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                            self.manager.item_metadata(step)['state'])
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return jax.tree.map(np.asarray, restored.state)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
