"""Gradient probes: the exact ∂L/∂x_l and ‖x_l‖ at every unit of a real network.

The paper's Eq. 4–5: with identity shortcuts and nothing after the addition,
x_L = x_l + Σ_{i=l}^{L−1} F(x_i), so ∂L/∂x_l = ∂L/∂x_L (1 + ∂/∂x_l Σ F) and any deeper
gradient reaches every shallower unit unchanged. With a scaled shortcut λ (Eq. 7) it
is multiplied by λ per unit instead. The probes measure this with jax.grad through the
network itself: every unit adds a zero 'perturbation' to its input x_l, and the
gradient of the loss with respect to that perturbation is exactly ∂L/∂x_l (under
nn.scan too, where the perturbations are stacked per unit).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from preact import models, paper, units


@dataclasses.dataclass
class ProbeResult:
  """Per unit l, in network order: stage, ‖∂L/∂x_l‖, that norm over the stage's last
  unit's, the cosine with the stage's last unit's gradient (NaN where the shapes
  differ: a stage's first unit reads the previous stage's shape), and ‖x_l‖."""
  stage: np.ndarray
  grad_norm: np.ndarray
  ratio: np.ndarray
  cosine: np.ndarray
  act_norm: np.ndarray
  loss: float
  info: dict = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.stage)

  def units(self) -> list[dict]:
    return [dict(index=i, stage=int(self.stage[i]), grad_norm=_num(self.grad_norm[i]),
                 ratio=_num(self.ratio[i]), cosine=_num(self.cosine[i]),
                 act_norm=_num(self.act_norm[i])) for i in range(len(self))]

  def to_json(self) -> dict:
    return {**self.info, 'loss': _num(self.loss), 'units': self.units()}


def _num(x):
  x = float(x)
  return x if np.isfinite(x) else None  # JSON has no NaN


def zero_perturbations(model, images) -> dict:
  """Zeros shaped like every unit input x_l for this batch (stacked under scan)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          images)['perturbations']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def probe_loss(model, variables, perturbations, images, labels, train, rng):
  """Mean cross-entropy with ``perturbations`` added to the unit inputs; aux: the
  sown unit inputs x_l."""
  mutable = ['intermediates'] + (['batch_stats'] if train else [])
  logits, state = model.apply(
      {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}),
       'perturbations': perturbations}, images, train=train, mutable=mutable,
      rngs={'dropout': rng})
  loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))
  return loss, state['intermediates']


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def _probe(model, variables, perturbations, images, labels, train, rng):
  """Per unit: the largest |∂L/∂x_l| and |x_l|, and the sums Σ(g/max|g|)²,
  Σ (g/max|g|)·(g_L/max|g_L|) with the stage's last unit's g_L, and Σ(x/max|x|)², in
  float32. Scaled so that squares of the tiny gradients of a deep scaled-shortcut net
  do not underflow; the host combines them in float64 (:func:`gradient_probe`)."""
  (loss, inter), grads = jax.value_and_grad(
      functools.partial(probe_loss, model, variables), has_aux=True)(
          perturbations, images, labels, train, rng)
  g_blocks, x_blocks = models.unit_blocks(grads), models.unit_blocks(inter)
  cols = {k: [] for k in ('stage', 'grad_max', 'grad_sq', 'dot', 'last', 'act_max', 'act_sq')}
  axes = lambda b: tuple(range(1, b.ndim))

  def scaled(b):
    top = jnp.max(jnp.abs(b), axis=axes(b))
    safe = jnp.where(top > 0, top, 1).reshape((-1,) + (1,) * (b.ndim - 1))
    return top, b / safe

  offset = 0
  for s in sorted(g_blocks):
    _, last = scaled(g_blocks[s][-1][-1:])
    n = sum(g.shape[0] for g in g_blocks[s])
    for g, x in zip(g_blocks[s], x_blocks[s]):
      top, unit = scaled(g)
      cols['grad_max'].append(top)
      cols['grad_sq'].append(jnp.sum(unit * unit, axis=axes(unit)))
      # The stage's first unit may read another shape than the last unit's input.
      cols['dot'].append(jnp.sum(unit * last, axis=axes(unit)) if g.shape[1:] == last.shape[1:]
                         else jnp.full(g.shape[:1], jnp.nan))
      cols['stage'].append(jnp.full(g.shape[:1], s))
      cols['last'].append(jnp.full(g.shape[:1], offset + n - 1))
      top, unit = scaled(x)
      cols['act_max'].append(top)
      cols['act_sq'].append(jnp.sum(unit * unit, axis=axes(unit)))
    offset += n
  return loss, {k: jnp.concatenate(v) for k, v in cols.items()}


def gradient_probe(model: models.ResNet, variables: dict, images, labels,
                   train: bool = False, rng=None) -> ProbeResult:
  """Exact per-unit gradient and activation statistics of ``model`` on one batch.

  ``images`` are model inputs (normalized); BN uses batch statistics if ``train``,
  else the running averages in ``variables``. Variables initialized on this very batch
  carry its zero perturbations already, which saves tracing the model once more."""
  images = jnp.asarray(images)
  labels = jnp.asarray(labels, jnp.int32)
  rng = jax.random.key(0) if rng is None else rng
  perturbations = variables.get('perturbations')
  if perturbations is None or _batch_size(perturbations) != images.shape[0]:
    perturbations = zero_perturbations(model, images)
  loss, cols = _probe(model, models.model_state(variables), perturbations, images, labels,
                      train, rng)
  # In float64, and from the same float32 numbers: a gradient bitwise equal to the last
  # unit's has ratio and cosine exactly 1 (the sums' product is exact in float64). A
  # gradient that is 0 in float32 (the vanishing of Eq. 7 past float32's range) has
  # norm 0, and ratio and cosine NaN where its stage's last unit's is 0 too.
  cols = {k: np.asarray(v, np.float64) for k, v in jax.device_get(cols).items()}
  last = cols['last'].astype(int)
  top, grad_sq = cols['grad_max'], cols['grad_sq']
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = top / top[last] * np.sqrt(grad_sq / grad_sq[last])
    ratio = np.where(top == 0, np.where(top[last] == 0, np.nan, 0.0), ratio)
    cosine = cols['dot'] / np.sqrt(grad_sq * grad_sq[last])
  return ProbeResult(stage=cols['stage'].astype(int), grad_norm=top * np.sqrt(grad_sq),
                     ratio=ratio, cosine=cosine,
                     act_norm=cols['act_max'] * np.sqrt(cols['act_sq']), loss=float(loss),
                     info=dict(unit=model.unit, stages=list(model.stage_sizes),
                               block=model.block, zero_init_last=model.zero_init_last,
                               bn='train' if train else 'eval'))


def _batch_size(perturbations) -> int:
  return models.unit_blocks(perturbations)[0][0].shape[1]  # blocks lead with a unit axis


@functools.partial(jax.jit, static_argnames=('model',))
def stage_changes(model, variables, images):
  """The identity-mapping test: with every residual branch zeroed (``zero_init_last``
  models at init), the relative change ‖x_out − x_in‖/‖x_in‖ across each stage, from
  its second unit's input to its last unit's. Zero exactly when the shortcut and
  after-addition path are identities; BN and running statistics in eval mode."""
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  blocks = models.unit_blocks(state['intermediates'])
  out = []
  for s in sorted(blocks):
    # From the stage's second unit on (past any projection) to its last unit's input.
    x_in, x_out = blocks[s][0][1] if len(blocks[s][0]) > 1 else blocks[s][1][0], \
        blocks[s][-1][-1]
    out.append(jnp.linalg.norm(x_out - x_in) / jnp.linalg.norm(x_in))
  return jnp.stack(out)


# --------------------------------------------------------------------------------------
# Whole probes as the command runs them.


def probe_batch(config, batch: int, split: str | None = None):
  """The first ``batch`` examples of ``split`` (default: the dataset's evaluation split),
  unaugmented and normalized."""
  from preact import data
  spec = data.spec(config.dataset)
  images, labels = data.first_examples(config, split or spec.eval_split, batch)
  mean, std = data.channel_stats(config.dataset, config.data_dir)
  return data.normalize(images, mean, std, np.float32), labels, spec.num_classes


def probe_variants(config, unit_names, depths, block='auto', zero_init_last=False,
                   batch=32, bn='auto', seed=0, progress=False):
  """Probes each unit variant at each depth at initialization; returns the results and
  the identity-mapping test {'<unit>@<depth>': per-stage relative change}."""
  images, labels, classes = probe_batch(config, batch)
  train_mode = bn != 'eval'

  def one(depth, unit):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.model.unit, c.model.depth = unit, depth
      c.model.block = paper.block(depth) if block == 'auto' else block
      c.model.zero_init_last = zero_init_last
      # The config's unit arguments where this unit has them, its defaults otherwise.
      params = units.UNITS[unit].params if unit in units.UNITS else {}
      for key in c.model.unit_args:
        if key not in params:
          c.model.unit_args[key] = None
    model = models.from_config(c, classes)
    zeroed = model.clone(zero_init_last=True)
    t = time.time()

    @jax.jit
    def init(key):
      # One program for both inits and the identity test: XLA merges the random draws
      # the two inits share (same key), and compiling dominates a probe's time.
      variables, z_vars = (m.init(key, images, train=False) for m in (model, zeroed))
      return variables, stage_changes(zeroed, models.model_state(z_vars), images)

    variables, change = init(models.init_key(seed))
    r = gradient_probe(model, variables, images, labels, train=train_mode)
    r.info['depth'] = depth
    change = [_num(v) for v in np.asarray(change)]
    if progress:
      print(f'  probed {unit:<22} depth {depth:<5} in {time.time() - t:5.1f}s', flush=True)
    return r, change

  jobs = [(d, u) for d in depths for u in unit_names]
  # XLA compiles with the GIL released: two probes at a time keep both cores busy.
  with concurrent.futures.ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
    done = list(pool.map(lambda job: one(*job), jobs))
  identity = {f'{u}@{d}': change for (d, u), (_, change) in zip(jobs, done)}
  return [r for r, _ in done], identity


def probe_checkpoint(workdir, batch: int = 32, bn: str = 'auto') -> ProbeResult:
  """Probes a preact-train run's latest checkpoint on its own evaluation data."""
  from preact import checkpoint, runrecord
  config = runrecord.read_config(workdir)
  images, labels, classes = probe_batch(config, batch)
  model = models.from_config(config, classes)
  ck = checkpoint.Checkpoints(workdir)
  try:
    state = ck.restore_arrays()
  finally:
    ck.close()
  r = gradient_probe(model, state, images, labels, train=bn == 'train')
  r.info.update(depth=config.model.depth, step=int(state['step']), workdir=str(workdir))
  return r


# --------------------------------------------------------------------------------------
# Over training.


class TrainingProbe:
  """The probe a run takes of its own state every ``config.probe_every`` steps: on the
  first ``config.probe_batch`` examples of the training split (unaugmented; the same for
  every seed and variant, so they compare on one batch), BN with that batch's statistics
  as in the train step, and no dropout. One compiled program for the whole run."""

  def __init__(self, config, model):
    self.model = model
    self.images, self.labels, _ = probe_batch(config, config.probe_batch, 'train')
    self.zeros = zero_perturbations(model, self.images)

  def __call__(self, params, batch_stats) -> ProbeResult:
    variables = {'params': params, 'batch_stats': batch_stats, 'perturbations': self.zeros}
    return gradient_probe(self.model, variables, self.images, self.labels, train=True)


def row(step: int, result: ProbeResult) -> dict:
  """A probes.jsonl row: the step, the probe's loss, then per unit its stage, grad_norm,
  ratio, cosine and act_norm."""
  return {'step': int(step), 'loss': _num(result.loss), 'units': result.units()}


def over_training(workdir, batch: int | None = None, progress: bool = False) -> list[dict]:
  """A run's probes over training: its probes.jsonl, or, for a run trained without
  in-training probes, :func:`probe_checkpoints`."""
  from etils import epath
  from preact import logs
  return (logs.read_jsonl(epath.Path(workdir) / 'probes.jsonl')
          or probe_checkpoints(workdir, batch, progress))


def probe_checkpoints(workdir, batch: int | None = None, progress: bool = False) -> list[dict]:
  """probes.jsonl rows of every checkpoint a run kept, probed as the run probes itself
  (:class:`TrainingProbe`; ``batch`` examples, default the run's ``probe_batch``)."""
  from preact import checkpoint, data, runrecord
  config = runrecord.read_config(workdir)
  with config.unlocked():
    config.probe_batch = batch or config.probe_batch
  probe = TrainingProbe(config, models.from_config(config, data.spec(config.dataset).num_classes))
  rows = []
  ck = checkpoint.Checkpoints(workdir)
  try:
    for step in ck.steps():
      state = ck.restore_arrays(step)
      rows.append(row(step, probe(state['params'], state['batch_stats'])))
      if progress:
        print(f'  probed the checkpoint of step {step}', flush=True)
  finally:
    ck.close()
  return rows


def over_training_table(rows) -> str:
  """One line per probe of a run: its loss, the first unit's gradient over the last's,
  and the range of the per-unit ratio and cosine."""
  lines = [f'{"step":>8} {"loss":>8} {"first/last":>10} {"min ratio":>10} {"max ratio":>10} '
           f'{"min cosine":>10}']
  from preact.logs import unit_column
  for r in rows:
    g, ratio, cosine = (unit_column(r, k) for k in ('grad_norm', 'ratio', 'cosine'))
    lines.append(f'{r["step"]:8d} {r["loss"] or np.nan:8.4f} {g[0] / g[-1]:10.4g} '
                 f'{np.nanmin(ratio):10.4g} {np.nanmax(ratio):10.4g} '
                 f'{np.nanmin(cosine) if np.isfinite(cosine).any() else np.nan:10.4g}')
  return '\n'.join(lines)


def summary_table(results) -> str:
  """One line per probe: the paper's comparison, first unit's gradient over last's."""
  lines = [f'{"unit":<22} {"depth":>5} {"bn":<5} {"loss":>8} {"|g_first|":>10} '
           f'{"|g_last|":>10} {"first/last":>10} {"min ratio":>10} {"max ratio":>10}']
  for r in results:
    lines.append(f'{r.info["unit"]:<22} {r.info.get("depth", ""):>5} {r.info["bn"]:<5} '
                 f'{r.loss:8.4f} {r.grad_norm[0]:10.4g} {r.grad_norm[-1]:10.4g} '
                 f'{r.grad_norm[0] / r.grad_norm[-1]:10.4g} {np.nanmin(r.ratio):10.4g} '
                 f'{np.nanmax(r.ratio):10.4g}')
  return '\n'.join(lines)
