#!/usr/bin/env python3
"""Several GPU hosts under SLURM: writes an sbatch script and submits it.

  python launch/slurm.py --config=experiments/table4.py:c10_1001 --workdir=/shared/runs/x \
      --nodes=2 --gpus_per_node=8 [--partition=gpu] [--dry-run]
--dry-run prints the script and the sbatch command instead.
"""
import argparse
import os

import common  # noqa: F401
from preact import launchers

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--config', required=True)
p.add_argument('--workdir', required=True, help='on a filesystem all nodes share')
p.add_argument('--nodes', type=int, default=1)
p.add_argument('--gpus_per_node', type=int, default=8)
p.add_argument('--time', default='48:00:00')
p.add_argument('--partition', default='')
p.add_argument('--job_name', default='preact')
p.add_argument('--script', default='preact.sbatch')
p.add_argument('--dry-run', action='store_true')
args, extra = p.parse_known_args()
extra = [e for e in extra if e != '--']
if args.nodes < 1 or args.gpus_per_node < 1:
  common.fail('--nodes and --gpus_per_node must be positive')
script = launchers.slurm_script(args.config, args.workdir, args.nodes, args.gpus_per_node,
                                extra, args.time, args.partition, args.job_name,
                                repo_dir=os.getcwd())
if args.dry_run:
  print(script)
  print(f'sbatch {args.script}')
  raise SystemExit(0)
with open(args.script, 'w') as f:
  f.write(script)
raise SystemExit(launchers.execute([['sbatch', args.script]], dry_run=False) and 1)
