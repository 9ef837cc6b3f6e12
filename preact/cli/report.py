"""preact-report: group runs by experiment and set ours beside the paper.

  preact-report runs/table1_mini runs/table2_mini --out=experiments/results/mini

Prints one markdown table per paper table (median over seeds, ± std, n, the paper's
number and the difference) and writes OUT/report.md and OUT/curves_*.png.
"""

from __future__ import annotations

from absl import flags

from preact.cli import common

_OUT = flags.DEFINE_string('out', None, 'Output directory for report.md and the curves.')


@common.main('preact-report')
def main(argv):
  paths = argv[1:]
  if not paths:
    raise common.UserError('name at least one run directory (or a directory of runs)')
  if not _OUT.value:
    raise common.UserError('--out is required')
  from preact import report
  print(report.write(paths, _OUT.value), flush=True)


def run():
  common.run(main)


if __name__ == '__main__':
  run()
