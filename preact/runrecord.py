"""A run's record in its workdir, kept consistent whatever happens to the process.

    WORKDIR/config.json     the validated config, written once it agrees with the
                            checkpoints, by a rename (never half-written)
    WORKDIR/outcome.json    completed | diverged | preempted | interrupted | failed
    WORKDIR/metrics.jsonl   one row per logged step, cut back to the restored step on
                            resume
    WORKDIR/.lock           host and pid of the trainer using the workdir
    WORKDIR/checkpoints/    orbax steps (preact.checkpoint)

Every check here raises :class:`UserError` before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading

from etils import epath

from preact import config as config_lib, paper
from preact.logs import log
from preact.errors import UserError

LOCK = '.lock'


def write_atomic(path, text: str) -> None:
  """Writes a whole file or nothing: a temp file beside it, then a rename."""
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_text(text)
  tmp.replace(path)


def to_json(obj, indent: int | None = 2) -> str:
  """JSON without bare NaN/Infinity tokens: non-finite numbers become null."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  return json.dumps(clean(obj), indent=indent, allow_nan=False)


def checkpoint_steps(workdir) -> list[int]:
  """The committed orbax steps, read from the directory names alone."""
  d = epath.Path(workdir) / 'checkpoints'
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def read_config(workdir) -> config_lib.ml_collections.ConfigDict:
  """The run's config.json, complete and valid, or a UserError saying what to do."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise UserError(f'{workdir} holds no run (no config.json); pass the --workdir of a '
                    'preact-train run')
  try:
    saved = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({e}); put back the config.json of the '
                    'run that wrote these checkpoints') from None
  if not isinstance(saved, dict):
    raise UserError(f'{path} holds no config; put back the run\'s config.json')
  return config_lib.from_dict(saved, source=str(path))


def check(workdir, config):
  """Refuses a workdir whose record disagrees with ``config``; writes nothing. Returns
  the config to run: ``config``, with the record's values of the keys a resume keeps
  (``config.RECORD_KEYS``)."""
  workdir = epath.Path(workdir)
  if not (workdir / 'config.json').exists():
    steps = checkpoint_steps(workdir)
    if steps:
      raise UserError(f'{workdir} holds checkpoints (steps {", ".join(map(str, steps))}) but '
                      'no config.json, so which run they belong to is unknown; put that '
                      "run's config.json back, or train in a new --workdir")
    return config
  old = read_config(workdir)
  diff = config_lib.differences(old.to_dict(), config.to_dict())
  if diff:
    raise UserError(f'{workdir} holds a different run (config {"; ".join(diff[:3])}); '
                    "use a new --workdir or pass that run's config")
  kept = {k: old[k] for k in sorted(config_lib.RECORD_KEYS) if old[k] != config[k]}
  if kept:
    log.info('%s resumes as it was recorded: %s', workdir,
             ', '.join(f'{k}={v} (not {config[k]})' for k, v in kept.items()))
    config = config.copy_and_resolve_references()
    for key, value in kept.items():
      paper.set_flat(config, key, value)
  return config


def recorded_outcome(workdir) -> dict | None:
  path = epath.Path(workdir) / 'outcome.json'
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None  # cut short by a kill: the run decides again


def truncate_logs(workdir, step: int) -> None:
  """Drops the rows that a run resumed at ``step`` writes again, so that each is logged
  once: metrics.jsonl rows past ``step`` (logged after the checkpoint it resumes from),
  and probes.jsonl rows past it, or every row when it starts over at step 0 (the probe
  of step 0 is taken again)."""
  _truncate(epath.Path(workdir) / 'metrics.jsonl', step)
  _truncate(epath.Path(workdir) / 'probes.jsonl', step if step else -1)


def _truncate(path, step: int) -> None:
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  keep = []
  for line in lines:
    try:
      if json.loads(line).get('step', 0) <= step:
        keep.append(line)
    except json.JSONDecodeError:
      pass  # a line cut short by a kill
  if len(keep) != len(lines):
    write_atomic(path, ''.join(l + '\n' for l in keep))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """One trainer per workdir. A second one refuses, naming the first's host and pid; a
  lock left by a dead process on this host is taken over. Remote (gs://) workdirs are
  not locked: their file systems have no exclusive create."""

  def __init__(self, workdir, enabled: bool = True):
    workdir = str(workdir)
    self.path = None if (not enabled or '://' in workdir) else os.path.join(workdir, LOCK)
    self.me = {'host': socket.gethostname(), 'pid': os.getpid()}

  def __enter__(self):
    if self.path is None:
      return self
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          with open(self.path) as f:
            holder = json.load(f)
        except (OSError, json.JSONDecodeError):
          holder = {}
        host, pid = holder.get('host', '?'), holder.get('pid', -1)
        if host == self.me['host'] and isinstance(pid, int) and not _alive(pid):
          os.remove(self.path)  # its process is gone
          continue
        raise UserError(f'{os.path.dirname(self.path)} is in use by another preact-train '
                        f'(host {host}, pid {pid}); wait for it to end, or stop it; if it '
                        f'is gone, delete {self.path}') from None
      with os.fdopen(fd, 'w') as f:
        json.dump(self.me, f)
      return self
    raise UserError(f'cannot lock {self.path}')

  def __exit__(self, *exc):
    if self.path is not None:
      try:
        os.remove(self.path)
      except OSError:
        pass
    return False


class Signals:
  """SIGTERM (preemption), SIGUSR1 (a scheduler's notice before its time limit, as
  SLURM's ``--signal=USR1@…`` sends it) and SIGINT (Ctrl-C) become a status the loop
  reads once a step: the run then saves at the step it reached and ends, with no
  traceback."""
  STATUS = {signal.SIGTERM: 'preempted', signal.SIGUSR1: 'preempted',
            signal.SIGINT: 'interrupted'}

  def __init__(self):
    self.status, self.name, self._previous = None, '', {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig, status in self.STATUS.items():
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, _frame):
    self.status, self.name = self.STATUS[signum], signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    return False
