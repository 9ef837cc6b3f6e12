"""Reports: runs grouped by experiment, ours (median over seeds) beside the paper.

A run's result is the test error of its last evaluation. As in the paper, a run whose
error stayed above 20%, or that diverged (non-finite loss, recorded by the trainer in
outcome.json), reads "fail".
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import OrderedDict

import numpy as np
from etils import epath

from preact import legacy, logs

FAIL_ABOVE = 20.0  # % test error: the paper's "fail"


@dataclasses.dataclass
class RunResult:
  workdir: str
  config: dict
  metrics: list
  outcome: dict
  error: float | None          # final test error %, None if never evaluated
  error_top5: float | None
  probes: list = dataclasses.field(default_factory=list)  # probes.jsonl rows, if any

  @property
  def failed(self) -> bool:
    """The paper's "fail": diverged, or test error above 20%. Mini runs are far too
    short for the 20% rule (it is about 64k iterations), so only divergence counts."""
    if self.outcome.get('status') == 'diverged':
      return True
    mini = self.config.get('paper', {}).get('mini', False)
    return not mini and self.error is not None and self.error > FAIL_ABOVE

  @property
  def seed(self) -> int:
    return self.config.get('seed', 0)

  @property
  def key(self) -> tuple:
    p = self.config.get('paper', {})
    if p.get('table'):
      return (p['table'] + (' (mini)' if p.get('mini') else ''), p['row'])
    m = self.config['model']
    return (self.config.get('experiment') or 'other',
            f'{self.config["dataset"]} {m["unit"]} {m["depth"]} {m["block"]}')


def find_runs(paths) -> list[str]:
  """Run directories (holding config.json) among ``paths`` and below them."""
  found = []

  def walk(p, depth):
    if (p / 'config.json').exists():
      found.append(str(p))
    elif depth and p.is_dir():  # epath has no recursive glob (it would be slow on GCS)
      for child in sorted(p.iterdir()):
        if child.is_dir() and child.name not in ('checkpoints', 'tensorboard'):
          walk(child, depth - 1)

  for p in map(epath.Path, paths):
    walk(p, 6)
  return list(OrderedDict.fromkeys(found))


def load_run(workdir) -> RunResult:
  w = epath.Path(workdir)
  # As this version spells it (records of older versions name some keys differently).
  config = legacy.migrate_dict(json.loads((w / 'config.json').read_text()))
  metrics = logs.read_jsonl(w / 'metrics.jsonl')
  outcome = json.loads((w / 'outcome.json').read_text()) if (w / 'outcome.json').exists() \
      else {'status': 'running', 'step': metrics[-1]['step'] if metrics else 0}
  evals = [r for r in metrics if r.get('test_error') is not None]
  error = 100 * evals[-1]['test_error'] if evals else None
  top5 = 100 * evals[-1]['test_error_top5'] if evals and 'test_error_top5' in evals[-1] else None
  return RunResult(str(w), config, metrics, outcome, error, top5,
                   logs.read_jsonl(w / 'probes.jsonl'))


def _fmt(x, digits=2):
  return '–' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def summarize(runs: list[RunResult]) -> dict:
  """{'median', 'std', 'low', 'high', 'n', 'failed', 'fail'} over the seeds of one
  experiment (a failed seed counts as an infinite error)."""
  done = [r for r in runs if r.error is not None or r.failed]
  errors = [math.inf if r.failed else r.error for r in done]
  finite = [e for e in errors if np.isfinite(e)]
  median = float(np.median(errors)) if errors else None
  mini = any(r.config.get('paper', {}).get('mini') for r in runs)
  return dict(median=median, std=float(np.std(finite)) if len(finite) > 1 else None,
              low=min(errors) if errors else None, high=max(errors) if errors else None,
              n=len(done), failed=sum(r.failed for r in done),
              fail=median is not None and (not np.isfinite(median) or
                                           (median > FAIL_ABOVE and not mini)))


def tables(runs: list[RunResult]) -> OrderedDict:
  """{table: {row: [runs]}} in first-seen order."""
  out: OrderedDict = OrderedDict()
  for r in runs:
    table, row = r.key
    out.setdefault(table, OrderedDict()).setdefault(row, []).append(r)
  return out


def _ranks(values: dict) -> dict:
  """1 = lowest error; 'fail' (inf) ranks last; ties share a rank."""
  order = sorted(set(values.values()))
  return {k: order.index(v) + 1 for k, v in values.items()}


def markdown(runs: list[RunResult]) -> str:
  parts = []
  for table, rows in tables(runs).items():
    summaries = {row: summarize(rs) for row, rs in rows.items()}
    ours_rank = _ranks({row: math.inf if s['fail'] else s['median']
                        for row, s in summaries.items() if s['median'] is not None})
    paper_rank = _ranks({row: math.inf if rs[0].config.get('paper', {}).get('fail')
                         else rs[0].config['paper']['error'] for row, rs in rows.items()
                         if rs[0].config.get('paper', {}).get('fail') or
                         rs[0].config.get('paper', {}).get('error', -1) >= 0})
    parts.append(f'### {table}\n')
    # An ordering between two rows holds only where their seed ranges do not overlap.
    parts.append('| experiment | unit | depth | ours: test error % (median) | ± std '
                 '| seeds: min – max | n | paper % | ours − paper | rank ours / paper |')
    parts.append('|---|---|---|---|---|---|---|---|---|---|')
    for row, rs in rows.items():
      s = summaries[row]
      c = rs[0].config
      paper = c.get('paper', {})
      paper_err = 'fail' if paper.get('fail') else (
          _fmt(paper['error']) if paper.get('error', -1) >= 0 else '–')
      ours = 'fail' if s['fail'] else _fmt(s['median'])
      if s['failed'] and not s['fail']:
        ours += f' ({s["failed"]} of {s["n"]} failed)'
      if s['fail']:
        reasons = {r.outcome.get('reason', '') for r in rs if r.outcome.get('status') == 'diverged'}
        if reasons:
          ours += ' (diverged)'
      diff = '–'
      if not s['fail'] and s['median'] is not None and paper_err not in ('fail', '–'):
        diff = f'{s["median"] - paper["error"]:+.2f}'
      depth = c['model']['depth']
      rank = f'{ours_rank.get(row, "–")} / {paper_rank.get(row, "–")}'
      spread = '–' if s['low'] is None else (
          f'{_fmt(s["low"])} – {_fmt(s["high"])}'.replace('inf', 'fail'))
      parts.append(f'| {row} | {c["model"]["unit"]} | {depth} | {ours} | {_fmt(s["std"])} '
                   f'| {spread} | {s["n"]} | {paper_err} | {diff} | {rank} |')
    parts.append('')
  return '\n'.join(parts)


def _load_or_warn(workdir) -> RunResult | None:
  try:
    return load_run(workdir)
  except (OSError, ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
    print(f'preact-report: warning: skipping {workdir}: {str(e).splitlines()[0][:200]}',
          file=sys.stderr, flush=True)
    return None


def _gradient_flow(runs: list[RunResult], out) -> str:
  """Heatmaps of the runs that probed themselves while training (probes.jsonl), each
  in OUT/probes/<row>_seed<N>/, all of them side by side, and the report's section."""
  from preact import plots
  probed = [r for r in runs if len(r.probes) >= 2]
  if not probed:
    return ''
  parts = []
  for r in probed:
    name = ''.join(ch if ch.isalnum() or ch in '.-' else '_' for ch in
                   f'{r.key[1]}_seed{r.seed}')
    where = out / 'probes' / name
    where.mkdir(parents=True, exist_ok=True)
    figures = plots.over_training(r.probes, f'{r.key[1]} (seed {r.seed})', where)
    parts.append(f'### {r.key[0]}: {r.key[1]}, seed {r.seed}\n\n' + '\n'.join(
        f'![{f}](probes/{name}/{f})' for f in figures) + '\n')
  together = ''
  if len(probed) > 1:
    named = {f'{r.key[1]} (seed {r.seed})': r.probes for r in probed}
    for field in ('ratio', 'act_norm'):
      plots.compare_over_training(named, field, out / 'probes' / f'all_{field}.png')
    together = '![all_ratio](probes/all_ratio.png)\n![all_act_norm](probes/all_act_norm.png)\n\n'
  return ('\n## Gradient flow over training\n\nPer unit l and probe step: '
          '‖∂L/∂x_l‖ over the stage\'s last unit\'s (log10; 0, white, is the identity '
          'path of Eq. 5) and ‖x_l‖, from each run\'s probes.jsonl.\n\n' + together +
          '\n'.join(parts))


def write(paths, out) -> str:
  """Loads the runs below ``paths`` (a run whose record cannot be read is skipped with a
  warning naming it), writes OUT/report.md and OUT/curves_*.png."""
  from preact import plots
  from preact.errors import UserError
  out = epath.Path(out)
  if out.exists() and not out.is_dir():
    raise UserError(f'--out {out} is a file; name a directory for report.md and the curves')
  runs = [r for r in map(_load_or_warn, find_runs(paths)) if r is not None]
  if not runs:
    raise UserError(f'no runs (directories with config.json) under {", ".join(map(str, paths))}')
  out.mkdir(parents=True, exist_ok=True)
  text = '# Results\n\n' + markdown(runs)
  figures = []
  for table, rows in tables(runs).items():
    name = 'curves_' + ''.join(ch if ch.isalnum() else '_' for ch in table).strip('_') + '.png'
    plots.training_curves(rows, table, out / name)
    figures.append(name)
  text += '\n' + '\n'.join(f'![{f}]({f})' for f in figures) + '\n'
  text += _gradient_flow(runs, out)
  (out / 'report.md').write_text(text)
  return text
