"""preact-probe: exact ∂L/∂x_l and ‖x_l‖ across depth, per unit variant, with plots.

  preact-probe --out=probe_out          # 10 variants at ResNet-110 and ResNet-164
  preact-probe --units=full_preact,constant_scaling --depth=1001 --batch=8 --out=o
  preact-probe --workdir=runs/fmnist --out=o   # a trained run's latest checkpoint
  preact-probe --workdir=runs/fmnist --over_training --out=o   # its probes over training

Writes OUT/probe.json and OUT/grad_norm.png, OUT/act_norm.png, OUT/identity.png; with
--over_training OUT/probes.jsonl and the heatmaps OUT/probe_ratio.png,
OUT/probe_act_norm.png and OUT/probe_profiles.png.
"""

from __future__ import annotations

import json
import time

from absl import flags

from preact.cli import common

_CONFIG = common.config_flag('Data and model settings (default: the embedded default).',
                             default=common.default_config)
_WORKDIR = flags.DEFINE_string('workdir', None, "Probe this run's latest checkpoint on its "
                               'own data (its unit and depth).')
_OVER = flags.DEFINE_bool('over_training', False, "With --workdir: the run's probes over "
                          'training (its probes.jsonl, or a probe of every kept checkpoint) '
                          'as unit × step heatmaps.')
_UNITS = flags.DEFINE_list('units', None, 'Unit variants to probe (default: every '
                           'registered unit, preact.units.UNITS).')
_DEPTH = flags.DEFINE_list('depth', ['110', '164'], 'CIFAR-style depths.')
_BLOCK = flags.DEFINE_enum('block', 'auto', ['auto', 'basic', 'bottleneck', 'one_layer'],
                           "auto: the paper's block per depth (164 and 1001 bottleneck).")
_ZERO = flags.DEFINE_bool('zero_init_last', False, 'Zero the last layer of every branch.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Examples in the probed batch.')
_BN = flags.DEFINE_enum('bn', 'auto', ['auto', 'train', 'eval'], 'BN statistics: batch '
                        '(train) or running (eval); auto: train at init, eval for --workdir.')
_SEED = flags.DEFINE_integer('seed', 0, 'Initialization seed.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')


@common.main('preact-probe')
def main(argv):
  common.no_arguments(argv)
  if not _OUT.value:
    raise common.UserError('--out is required: the directory for probe.json and the plots')
  if _BATCH.value < 1:
    raise common.UserError(f'--batch must be positive, got {_BATCH.value}')
  from etils import epath
  from preact import plots, probes, units
  t0 = time.time()
  if _OVER.value:
    return _over_training(t0)
  if _WORKDIR.value:
    results = [probes.probe_checkpoint(_WORKDIR.value, _BATCH.value, _BN.value)]
    identity = None
  else:
    config = _CONFIG.value
    depths = _parse_depths(_DEPTH.value)
    results, identity = probes.probe_variants(
        config, _UNITS.value or list(units.UNITS), depths, _BLOCK.value, _ZERO.value,
        _BATCH.value, _BN.value, _SEED.value, progress=True)
  out = epath.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  doc = {'probes': [r.to_json() for r in results]}
  if identity:
    doc['identity'] = identity
  (out / 'probe.json').write_text(json.dumps(doc, indent=1))
  plots.probe_figures(results, identity, out)
  print(probes.summary_table(results))
  print(f'wrote {out}/probe.json and plots in {time.time() - t0:.0f}s', flush=True)


def _over_training(t0):
  from etils import epath
  from preact import plots, probes
  if not _WORKDIR.value:
    raise common.UserError('--over_training probes a run: pass its --workdir')
  rows = probes.over_training(_WORKDIR.value, progress=True)
  if not rows:
    raise common.UserError(f'{_WORKDIR.value} has neither probes.jsonl nor checkpoints to '
                           'probe; train it with --config.probe_every=N')
  out = epath.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'probes.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  names = plots.over_training(rows, epath.Path(_WORKDIR.value).name, out)
  print(probes.over_training_table(rows))
  print(f'wrote {out}/probes.jsonl and {", ".join(names)} in {time.time() - t0:.0f}s',
        flush=True)


def _parse_depths(values):
  try:
    return [int(v) for v in values]
  except ValueError:
    raise common.UserError(f'--depth takes integers, got {",".join(values)}') from None


def run():
  common.run(main)


if __name__ == '__main__':
  run()
