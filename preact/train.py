"""Training and evaluation with the paper's recipe, as an importable library.

``train_and_evaluate(config, workdir)`` is the whole run: it resumes from the latest
checkpoint in workdir, trains to ``config.total_steps``, evaluates and checkpoints
along the way, and returns the run's outcome. The step itself is one per-replica
function (:func:`preact.step.make_train_step`) mapped over devices by
:mod:`preact.parallel`.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from preact import checkpoint, config as config_lib, data, logs, models, parallel, probes, runrecord
from preact.errors import UserError
from preact.step import (TrainState, init_state, make_eval_step, make_optimizer,
                         make_schedule, make_train_step)

log = logging.getLogger('preact')  # absl's handler prints it; orbax's chatter stays off


# Exit status of preact-train for each outcome (sweeps and schedulers read it).
EXIT_CODES = {'completed': 0, 'diverged': 3, 'failed': 1, 'interrupted': 130,
              'preempted': 143}


# --------------------------------------------------------------------------------------
# A run: everything a config and a workdir determine.


class Run:
  """The model, data, mapped steps and checkpoints of one validated config
  (:func:`preact.config.validate`) in one workdir."""

  def __init__(self, config: ml_collections.ConfigDict, workdir, for_eval: bool = False,
               devices=None):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.spec = data.spec(config.dataset)
    self.model = models.from_config(config, self.spec.num_classes)  # bad settings fail before I/O
    self.replicas = parallel.Replicas(config.parallelism, devices)
    self.replicas.check_batch('batch_size', config.batch_size)
    self.replicas.check_batch('eval_batch_size', config.eval_batch_size)
    self.train_data = None if for_eval else self.spec.pipeline.train(
        config, jax.process_index(), jax.process_count())
    self.mean, self.std = data.channel_stats(config.dataset, config.data_dir)
    self.image_shape = self.spec.pipeline.image_shape(config)
    self.tx = make_optimizer(config.optimizer, config.total_steps)
    self.schedule = make_schedule(config.optimizer, config.total_steps)
    self.train_step = self.replicas.map(
        make_train_step(self.model, self.tx, self.mean, self.std, config.seed))
    self.eval_step = self.replicas.map(make_eval_step(self.model, self.mean, self.std),
                                       donate_state=False)

  def init_state(self) -> TrainState:
    return init_state(self.model, self.tx, self.config.seed, self.image_shape,
                      self.replicas.replicated)

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(lambda: init_state(self.model, self.tx, self.config.seed,
                                             self.image_shape))

  def evaluate(self, state: TrainState, split: str | None = None) -> dict:
    """Loss and error over every example of the split, each counted exactly once."""
    split = split or self.spec.eval_split
    batches = self.spec.pipeline.evaluation(self.config, split, jax.process_index(),
                                            jax.process_count())
    totals = None
    for batch in batches:
      sums = self.eval_step(state, self.replicas.put_batch(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = float(totals['examples'])
    return {'loss': float(totals['loss']) / n, 'error': float(totals['errors']) / n,
            'accuracy': 1.0 - float(totals['errors']) / n,
            'error_top5': float(totals['errors_top5']) / n, 'examples': int(n)}


def _restore(run: Run, ckpts: checkpoint.Checkpoints, workdir) -> TrainState:
  state = run.init_state()
  if ckpts.latest() is not None:
    state, _ = ckpts.restore(state)
    log.info('resumed from step %d in %s', int(state.step), workdir)
  return run.replicas.for_step(state)


def _log_row(run: Run, pending: list, step: int, since: tuple[int, float]) -> dict:
  """Means of the metrics since the last row, images/s and the lr of the last step."""
  fetched = jax.device_get(pending)
  row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  row['images_per_s'] = (step - since[0]) * run.config.batch_size / max(time.time() - since[1],
                                                                        1e-9)
  row['lr'] = float(run.schedule(step - 1))
  return row


_KERNELS = {'off': "XLA's", 'xla': "XLA's, in preact.cpu_kernels' formulations",
            'onednn': "oneDNN's (preact.onednn)"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, devices=None) -> dict:
  """Trains (resuming if workdir has checkpoints) and returns the outcome:
  {'status': completed | diverged | preempted | interrupted | failed, 'step', 'reason',
  'test_error'}. preact-train exits with ``EXIT_CODES[status]``.

  Nothing is written until the config is valid and agrees with the workdir's record;
  no non-finite state is ever saved. ``devices`` defaults to every device."""
  workdir = epath.Path(workdir)
  config = config_lib.validate(config)
  lead = jax.process_index() == 0
  # The record says how the net was built (scanned or not sets the checkpoint's layout),
  # not what 'auto' would choose on the next machine.
  config = config.copy_and_resolve_references()
  config.model.scan = models.scan_setting(config.model.scan, config.model.depth,
                                          config.model.cpu_kernels)
  config = runrecord.check(workdir, config)
  recorded = runrecord.recorded_outcome(workdir)
  if recorded and recorded.get('status') == 'diverged':
    log.info('%s diverged before (%s); not training it again', workdir,
                 recorded.get('reason'))
    return recorded
  run = Run(config, workdir, devices=devices)  # bad settings fail before any write
  log.info('%s on %s: %d process(es), %d local and %d global devices, batch %d (%d per '
           'device), %s, conv and BN kernels: %s', workdir, jax.default_backend(),
           jax.process_count(), run.replicas.local_count, run.replicas.count,
           config.batch_size, config.batch_size // run.replicas.count, config.parallelism,
           _KERNELS[run.model.cpu_kernels])
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create workdir {workdir}: {e}') from None
  with runrecord.Lock(workdir, enabled=lead), runrecord.Signals() as signals:
    if lead:
      runrecord.write_atomic(workdir / 'config.json', config_lib.to_json(config))
    ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
    try:
      state = _restore(run, ckpts, workdir)
    except BaseException:
      ckpts.close()
      raise
    start = int(state.step)
    if start >= config.total_steps and recorded:
      ckpts.close()
      log.info('%s already trained to step %d', workdir, start)
      return recorded  # keep what it recorded
    if lead:
      runrecord.truncate_logs(workdir, start)
    outcome = _train(run, state, start, ckpts, signals, lead)
  if lead:
    try:
      runrecord.write_atomic(workdir / 'outcome.json', runrecord.to_json(outcome))
    except OSError as e:
      log.error('cannot record the outcome in %s: %s', workdir, e)
  log.info('outcome: %s', outcome)
  return outcome


def _train(run: Run, state: TrainState, start: int, ckpts, signals: runrecord.Signals,
           lead: bool) -> dict:
  """The loop: steps, log rows, evaluations and checkpoints until the end, a signal, the
  first non-finite step or a failed write."""
  config, total = run.config, run.config.total_steps
  writer = logs.Writer(run.workdir, enabled=lead)
  if start == 0:
    writer.hparams(config_lib.flatten(config))
  outcome = {'status': 'completed', 'step': start, 'reason': '', 'test_error': None}
  # Its batch is read before the prefetch thread starts reading the training data.
  probe = probes.TrainingProbe(config, run.model) if config.probe_every else None
  batches = None
  if start < total:
    batches = data.Prefetch(run.train_data.batches(start), run.replicas.put_batch,
                            total - start, config.prefetch)
  progress = logs.Progress(config.progress, start, total, config.log_every)
  pending, since, step = [], (start, time.time()), start
  trace = _Trace(run.workdir, config.profile_steps, enabled=lead)
  try:
    if probe and start == 0:
      writer.probe(probes.row(0, probe(state.params, state.batch_stats)))
    while step < total:
      trace.before(step + 1)
      state, metrics = run.train_step(state, next(batches))
      step += 1
      trace.after(step, state)
      pending.append(metrics)
      stop = _stop_requested(signals, step)
      write_row = step % config.log_every == 0 or step == total
      save = step % config.checkpoint_every == 0 or step == total or stop
      if (write_row or save) and _diverged(state, step, pending, outcome, writer):
        break
      if probe and (step % config.probe_every == 0 or step == total):
        writer.probe(probes.row(step, probe(state.params, state.batch_stats)))
      row = {}
      if write_row:
        row = _log_row(run, pending, step, since)
        pending, since = [], (step, time.time())
      if step % config.eval_every == 0 or step == total:
        row.update(_evaluate_row(run, state, outcome))
        since = (since[0], time.time())  # images/s counts training time only
      if row:
        writer.write({'step': step, **row})
      progress.update(step, {k: v for k, v in row.items()
                             if k in ('train_loss', 'train_error', 'test_error')} or None)
      if save and not _saved(run, ckpts, state, step, outcome):
        break
      if stop:
        outcome.update(status=stop, reason=f'{signals.name or "a signal to another process"}'
                                           f'; checkpoint saved at step {step}')
        break
    if outcome['status'] not in ('diverged', 'failed'):
      outcome['step'] = step
  finally:
    trace.close()
    progress.close()
    if batches is not None:
      batches.close()
    try:
      ckpts.close()
    except OSError as e:
      outcome.update(status='failed', reason=f'saving a checkpoint failed: {e}')
    writer.close()
  return outcome


class _Trace:
  """An XProf trace of the steps ``config.profile_steps`` (first, last)."""

  def __init__(self, workdir, steps, enabled: bool):
    self.dir = str(epath.Path(workdir) / 'profile')
    self.steps = tuple(steps) if enabled else ()
    self.on = False

  def before(self, step: int):
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.dir)
      self.on = True

  def after(self, step: int, state):
    if self.on and step == self.steps[1]:
      jax.block_until_ready(state)
      self.close()

  def close(self):
    if self.on:
      jax.profiler.stop_trace()
      self.on = False
      log.info('wrote an XProf trace of steps %d–%d to %s', *self.steps, self.dir)


# With several processes a signal reaches one of them (a preempted host, a Ctrl-C), but
# all must stop at the same step: one that went on would wait forever in the next
# collective. Every this many steps they agree, by a tiny all-gather, on whether any
# was signalled.
STOP_CHECK_EVERY = 10


def _stop_requested(signals: runrecord.Signals, step: int) -> str | None:
  """The status to stop with after this step ('preempted', 'interrupted') or None;
  read once per step, so a signal arriving later counts from the next step."""
  if jax.process_count() == 1:
    return signals.status
  if step % STOP_CHECK_EVERY:
    return None
  from jax.experimental import multihost_utils
  order = [None, 'interrupted', 'preempted']  # preemption wins: a scheduler requeues it
  mine = np.int32(order.index(signals.status))
  return order[int(np.max(multihost_utils.process_allgather(mine)))]


def _diverged(state: TrainState, step: int, pending: list, outcome: dict, writer) -> bool:
  """Whether a step since the last check was not finite (the only host sync besides
  logging); if so the outcome records the first such step."""
  bad = int(jax.device_get(state.bad_step))
  if not bad:
    return False
  fetched = jax.device_get(pending[:bad - (step - len(pending))])
  outcome.update(status='diverged', step=bad,
                 reason=f'train loss {float(fetched[-1]["train_loss"])} or its gradients not '
                        f'finite at step {bad}; the last checkpoint is the last finite state')
  writer.write({'step': bad, 'train_loss': fetched[-1]['train_loss']})
  log.warning('diverged: %s', outcome['reason'])
  return True


def _evaluate_row(run: Run, state: TrainState, outcome: dict) -> dict:
  ev = run.evaluate(state)
  outcome['test_error'] = ev['error']
  return {'test_loss': ev['loss'], 'test_error': ev['error'],
          'test_error_top5': ev['error_top5']}


def _saved(run: Run, ckpts, state: TrainState, step: int, outcome: dict) -> bool:
  """Saves the step's checkpoint; a failed write stops the run as 'failed'."""
  try:
    ckpts.save(step, run.replicas.for_save(state), {'step': step,
                                                    'dataset': run.config.dataset})
    return True
  except OSError as e:
    outcome.update(status='failed', step=step,
                   reason=f'saving the checkpoint of step {step} failed: {e}')
    return False


def evaluate_checkpoint(workdir, step: int | None = None, split: str | None = None,
                        devices=None) -> dict:
  """Restores a run's checkpoint with the run's own config and evaluates a whole split.
  The config and the checkpoint are checked before any data is read."""
  workdir = epath.Path(workdir)
  config = runrecord.read_config(workdir)
  steps = runrecord.checkpoint_steps(workdir)
  if not steps:
    raise UserError(f'no checkpoint in {workdir / "checkpoints"}; train first, or pass '
                    'the --workdir of a run that saved one')
  if step is not None and step not in steps:
    raise UserError(f'no checkpoint for step {step} in {workdir / "checkpoints"} (have: '
                    f'{", ".join(map(str, steps))})')
  run = Run(config, workdir, for_eval=True, devices=devices)
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  try:
    state, _ = ckpts.restore(run.abstract_state(), step, sharding=run.replicas.replicated)
  finally:
    ckpts.close()
  state = run.replicas.for_step(state)
  split = split or run.spec.eval_split
  result = {'step': int(state.step), 'split': split, **run.evaluate(state, split)}
  recorded = runrecord.recorded_outcome(workdir) or {}
  result['run_status'] = recorded.get('status', 'unfinished')
  if recorded.get('status') == 'diverged':
    result['run_reason'] = recorded.get('reason', '')
  return result


def record_eval(workdir, result: dict) -> None:
  """Appends an evaluation to workdir/eval.jsonl (process 0)."""
  if jax.process_index() == 0:
    with (epath.Path(workdir) / 'eval.jsonl').open('a') as f:
      f.write(runrecord.to_json(result, indent=None) + '\n')
