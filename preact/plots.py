"""Figures: gradient and activation norms across depth, the identity-mapping test,
gradient flow over training, and training curves in the style of the paper's Fig. 1
and Fig. 6."""

from __future__ import annotations

from collections import defaultdict

import matplotlib

matplotlib.use('Agg')  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402


def _line_style(unit: str) -> str:
  """Activation placements solid, shortcut variants dashed: Fig. 4 and Fig. 2 separate."""
  from preact import units
  known = units.UNITS.get(unit)
  return '-' if known is None or known.identity_shortcut else '--'


def _save(fig, path):
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, dpi=110, bbox_inches='tight')
  plt.close(fig)


def _by_depth(results):
  groups = defaultdict(list)
  for r in results:
    groups[r.info.get('depth', '?')].append(r)
  return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))


def _norm_figure(results, field, ylabel, title, path):
  groups = _by_depth(results)
  fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.6), squeeze=False)
  for ax, (depth, rs) in zip(axes[0], groups.items()):
    for r in rs:
      y = getattr(r, field)
      ax.plot(np.arange(len(y)), y, label=r.info['unit'], lw=1.4,
              ls=_line_style(r.info['unit']))
    for i in np.flatnonzero(np.diff(rs[0].stage)) + 1:
      ax.axvline(i - 0.5, color='0.6', lw=0.8, ls=':', zorder=0)
    ax.set_yscale('log')
    ax.set_xlabel('unit index l (stage boundaries dotted)')
    ax.set_ylabel(ylabel)
    ax.set_title(f'{title}, depth {depth} ({rs[0].info.get("block", rs[0].info.get("branch"))}, BN {rs[0].info["bn"]})')
    ax.grid(True, which='major', alpha=0.3)
  axes[0][-1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5))
  _save(fig, path)


def probe_figures(results, identity, out):
  """grad_norm.png, act_norm.png and (at initialization) identity.png in ``out``."""
  out = epath.Path(out)
  _norm_figure(results, 'grad_norm', '‖∂L/∂x_l‖ (exact)', 'Gradient at each unit input',
               out / 'grad_norm.png')
  _norm_figure(results, 'act_norm', '‖x_l‖', 'Forward signal', out / 'act_norm.png')
  if identity:
    _identity_figure(identity, out / 'identity.png')


def _identity_figure(identity, path):
  depths = sorted({k.split('@')[1] for k in identity}, key=int)
  fig, axes = plt.subplots(1, len(depths), figsize=(6.5 * len(depths), 4.6), squeeze=False)
  for ax, depth in zip(axes[0], depths):
    rows = [(k.split('@')[0], v) for k, v in identity.items() if k.split('@')[1] == depth]
    stages = len(rows[0][1])
    y = np.arange(len(rows))
    h = 0.8 / stages
    for s in range(stages):
      vals = [np.nan if v[s] is None else v[s] for _, v in rows]
      ax.barh(y + (s - (stages - 1) / 2) * h, vals, height=h, label=f'stage {s + 1}')
    for i, (_, v) in enumerate(rows):
      finite = [x for x in v if x is not None]
      if all(x == 0 for x in finite):
        ax.text(0.002, i, 'identity (exactly 0)', va='center', fontsize=8)
      elif max(finite) < 0.01:  # too short a bar to see
        ax.text(0.002, i, f'{max(finite):.1e}', va='center', fontsize=8)
    ax.set_yticks(y, [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel('‖x_out − x_in‖ / ‖x_in‖ across a stage, branches zeroed')
    ax.set_title(f'Identity-mapping test, depth {depth}')
    ax.grid(True, axis='x', alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  _save(fig, path)


def training_curves(rows, title, path):
  """The paper's Fig. 1 / Fig. 6 style: test error (dashed, left axis) and training
  loss (solid, right axis) against iterations, one color per experiment; each seed
  drawn thin."""
  fig, ax = plt.subplots(figsize=(8, 5))
  loss_ax = ax.twinx()
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (row, runs) in enumerate(rows.items()):
    color = colors[i % len(colors)]
    for j, run in enumerate(runs):
      m = run.metrics
      train = [(r['step'], r['train_loss']) for r in m if 'train_loss' in r
               and np.isfinite(r['train_loss'])]
      test = [(r['step'], 100 * r['test_error']) for r in m if 'test_error' in r]
      label = row if j == 0 else None
      if train:
        loss_ax.plot(*zip(*train), color=color, lw=1.0, alpha=0.8)
      if test:
        ax.plot(*zip(*test), color=color, lw=1.6, ls='--', marker='.', label=label)
  ax.set_xlabel('iterations')
  ax.set_ylabel('test error % (dashed)')
  loss_ax.set_ylabel('training loss (solid)')
  loss_ax.set_yscale('log')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  if rows:
    ax.legend(fontsize=7, loc='upper right')
  _save(fig, path)


# --------------------------------------------------------------------------------------
# Over training: rows of probes.jsonl (preact.probes.row).


def _columns(rows, field) -> np.ndarray:
  """(probes, units) of one per-unit field; None (non-finite) as NaN."""
  from preact.logs import unit_column
  return np.stack([unit_column(r, field) for r in rows])


def _stage_lines(ax, stages, vertical=True):
  for i in np.flatnonzero(np.diff(stages)) + 1:  # over a heatmap (horizontal), under lines
    (ax.axvline if vertical else ax.axhline)(i - 0.5, color='0.3' if not vertical else '0.6',
                                             lw=0.8, ls=':', zorder=0 if vertical else 3)


def _profile(axes, rows, title=''):
  """∂L/∂x_l relative to the stage's last unit, and ‖x_l‖, per unit, one line a row."""
  cmap = plt.get_cmap('viridis')
  for i, r in enumerate(rows):
    color = cmap(i / max(len(rows) - 1, 1))
    for ax, field in zip(axes, ('ratio', 'act_norm')):
      ax.plot(_columns([r], field)[0], color=color, lw=1.2, label=f'step {r["step"]}')
  stages = [u['stage'] for u in rows[0]['units']]
  for ax, label in zip(axes, ('‖∂L/∂x_l‖ / ‖∂L/∂x_last of stage‖', '‖x_l‖')):
    ax.set_yscale('log')
    ax.set_xlabel('unit index l (stage boundaries dotted)')
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    _stage_lines(ax, stages)
  axes[0].set_title(title)


def profile_png(row) -> tuple[bytes, int, int]:
  """One probe's per-unit profile as (PNG bytes, width, height): TensorBoard's image."""
  import io
  (w, h), dpi = (9, 3.2), 100
  fig, axes = plt.subplots(1, 2, figsize=(w, h), dpi=dpi)
  _profile(axes, [row], f'step {row["step"]}')
  # Fixed margins: a run draws one at every probe, and tight_layout would draw it twice
  # more to measure it.
  fig.subplots_adjust(left=0.08, right=0.985, bottom=0.15, top=0.9, wspace=0.25)
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  plt.close(fig)
  return buf.getvalue(), round(w * dpi), round(h * dpi)


_HEATMAPS = {  # field: (colorbar label, colormap, centred on log10 1 = 0)
    'ratio': ('log10 ‖∂L/∂x_l‖ / ‖∂L/∂x_last of its stage‖', 'RdBu_r', True),
    'act_norm': ('log10 ‖x_l‖', 'viridis', False),
}


def _log_field(rows, field) -> np.ndarray:
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.log10(_columns(rows, field)).T  # units down, steps across


def _limits(zs, centre) -> dict:
  finite = np.concatenate([z[np.isfinite(z)] for z in zs])
  if not finite.size:
    return {}
  if centre:  # log ratio 0 (the identity path's 1) in white
    top = max(np.abs(finite).max(), 1e-3)
    return dict(vmin=-top, vmax=top)
  return dict(vmin=finite.min(), vmax=finite.max())


def _heatmap(ax, rows, field, title, limits, invert=True):
  steps = np.array([r['step'] for r in rows])
  z = _log_field(rows, field)
  edges = np.concatenate([steps, [steps[-1] + max(np.diff(steps).min(initial=1), 1)]])
  mesh = ax.pcolormesh(edges, np.arange(z.shape[0] + 1) - 0.5, z, cmap=_HEATMAPS[field][1],
                       shading='flat', **limits)
  _stage_lines(ax, [u['stage'] for u in rows[0]['units']], vertical=False)
  if invert:  # unit 0 on top (once only, for axes that share y)
    ax.invert_yaxis()
  ax.set_xlabel('training step')
  ax.set_ylabel('unit index l')
  ax.set_title(title)
  return mesh


def over_training(rows, title, out) -> list[str]:
  """probe_ratio.png and probe_act_norm.png (unit × step heatmaps: log10 of ∂L/∂x_l over
  the stage's last unit's, and of ‖x_l‖) and probe_profiles.png (per-unit curves at a
  few steps) in ``out``; returns their names."""
  out = epath.Path(out)
  names = []
  for field, (label, _, centre) in _HEATMAPS.items():
    fig, ax = plt.subplots(figsize=(8, 4.8))
    mesh = _heatmap(ax, rows, field, f'{title}: {field} over training',
                    _limits([_log_field(rows, field)], centre))
    fig.colorbar(mesh, ax=ax, label=label)
    names.append(f'probe_{field}.png')
    _save(fig, out / names[-1])
  picks = sorted({0, len(rows) // 4, len(rows) // 2, len(rows) - 1})
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  _profile(axes, [rows[i] for i in picks], f'{title}: per unit at a few steps')
  axes[1].legend(fontsize=8)
  names.append('probe_profiles.png')
  _save(fig, out / names[-1])
  return names


def compare_over_training(runs: dict, field: str, path):
  """{name: probes.jsonl rows} side by side on one colour scale: which variants keep
  the identity path (ratio 1, white) while they train."""
  label, _, centre = _HEATMAPS[field]
  limits = _limits([_log_field(rows, field) for rows in runs.values()], centre)
  fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1.2, 4.2), squeeze=False,
                           sharey=True)
  for i, (ax, (name, rows)) in enumerate(zip(axes[0], runs.items())):
    mesh = _heatmap(ax, rows, field, name, limits, invert=i == 0)
  for ax in axes[0][1:]:
    ax.set_ylabel('')
  fig.colorbar(mesh, ax=list(axes[0]), label=label)
  _save(fig, path)
