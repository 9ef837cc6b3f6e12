"""What a run writes for people: metrics.jsonl, TensorBoard events, progress."""

from __future__ import annotations

import json
import sys
import time

import logging

import numpy as np
from etils import epath

log = logging.getLogger('preact')  # absl's handler prints it; orbax's chatter stays off


class Writer:
  """Appends metric rows to workdir/metrics.jsonl and TensorBoard; process 0 only."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self._tb = TensorBoard(epath.Path(workdir) / 'tensorboard') if enabled else None

  def write(self, row: dict):
    if not self.enabled:
      return
    # JSON has no NaN: a non-finite value is written as null.
    row = {k: int(v) if k == 'step' else (float(v) if np.isfinite(v) else None)
           for k, v in row.items()}
    with self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')
    for k, v in row.items():
      if k != 'step' and v is not None:
        self._tb.scalar(k, v, row['step'])
    self._tb.flush()

  def probe(self, row: dict):
    """A probes.jsonl row (:func:`preact.probes.row`); in TensorBoard its summary as
    scalars and the per-unit profile as an image."""
    if not self.enabled:
      return
    with (self.path.parent / 'probes.jsonl').open('a') as f:
      f.write(json.dumps(row) + '\n')
    step = row['step']
    grad, ratio, cosine = (unit_column(row, k) for k in ('grad_norm', 'ratio', 'cosine'))
    scalars = {'probe/loss': row['loss'], 'probe/grad_first_over_last': grad[0] / grad[-1],
               'probe/ratio_min': np.nanmin(ratio), 'probe/ratio_max': np.nanmax(ratio),
               'probe/cosine_min': np.nanmin(cosine) if np.isfinite(cosine).any() else None}
    for k, v in scalars.items():
      if v is not None and np.isfinite(v):
        self._tb.scalar(k, float(v), step)
    from preact import plots
    self._tb.image('probe/profile', plots.profile_png(row), step)
    self._tb.flush()

  def hparams(self, flat: dict):
    """The run's settings as TensorBoard hparams (lists as text), to compare runs by."""
    if self.enabled:
      self._tb.hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                        for k, v in flat.items() if v is not None})
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class TensorBoard:
  """TensorBoard event files: TensorBoard's record format and summary protos.

  Not through TensorFlow (tf.summary, as flax.metrics.tensorboard writes, or
  TensorBoard's EventFileWriter, whose tf.io.gfile imports it): importing TensorFlow
  costs every run, probe and evaluation 5 s at start-up, and nothing else in an
  in-memory run needs it. Files go through epath, so gs:// workdirs work as before."""

  def __init__(self, logdir):
    import os
    import socket
    from tensorboard.summary.writer.record_writer import RecordWriter
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # TensorBoard's file naming: one file per writer, read in order of their names.
    name = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
    self._records = RecordWriter((logdir / name).open('wb'))
    self._write(file_version='brain.Event:2')
    self.flush()

  def _write(self, step: int = 0, **fields):
    from tensorboard.compat.proto import event_pb2
    event = event_pb2.Event(wall_time=time.time(), step=int(step), **fields)
    self._records.write(event.SerializeToString())

  def _summary(self, step: int, tag: str, metadata, tensor):
    from tensorboard.compat.proto import summary_pb2
    self._write(step, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, metadata=metadata, tensor=tensor)]))

  def scalar(self, tag: str, value: float, step: int):
    from tensorboard.compat.proto import tensor_pb2, types_pb2
    from tensorboard.plugins.scalar import metadata
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[value])
    self._summary(step, tag, metadata.create_summary_metadata(tag, ''), tensor)

  def image(self, tag: str, png: tuple[bytes, int, int], step: int):
    """One image, as (PNG bytes, width, height)."""
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.image import metadata
    data, width, height = png
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[str(width).encode(), str(height).encode(), data],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3)]))
    self._summary(step, tag, metadata.create_summary_metadata(tag, '', converted_to_tensor=True),
                  tensor)

  def hparams(self, values: dict):
    from tensorboard.plugins.hparams import summary_v2
    self._write(summary=summary_v2.hparams_pb(values))

  def flush(self):
    self._records.flush()

  def close(self):
    self._records.close()


def unit_column(row: dict, field: str) -> np.ndarray:
  """One per-unit field of a probes.jsonl row, in unit order; null (non-finite) as NaN."""
  return np.array([np.nan if u[field] is None else u[field] for u in row['units']],
                  np.float64)


def read_jsonl(path) -> list[dict]:
  path = epath.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut short by a kill; the rest stand
  return rows


class Progress:
  """A bar with ETA on a terminal, a log line every ``every`` steps elsewhere."""

  def __init__(self, mode: str, start: int, total: int, every: int):
    bar = mode == 'bar' or (mode == 'auto' and sys.stderr.isatty())
    self.every, self.total = every, total
    self._bar = None
    import jax  # here, not at import: preact-report reads these files without JAX
    self._main = jax.process_index() == 0
    if bar and self._main:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)
    self._t0, self._s0 = time.time(), start

  def update(self, step: int, metrics: dict | None = None):
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if metrics:
        self._bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()}, refresh=False)
    elif metrics is not None and self._main:
      rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
      eta = (self.total - step) / rate if rate > 0 else float('inf')
      text = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
      log.info('step %d/%d %s (%.2f steps/s, ETA %s)', step, self.total, text, rate,
                   _hms(eta))

  def close(self):
    if self._bar is not None:
      self._bar.close()


def _hms(seconds: float) -> str:
  if seconds == float('inf'):
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}'
