#!/usr/bin/env python3
"""Cloud TPU VM pods: create, set up, run preact-train on every worker, fetch, delete.

  python launch/tpu_pod.py all --name=preact-v4 --zone=us-central2-b --accelerator=v4-32 \
      --config=experiments/table4.py:c10_1001 --workdir=gs://my-bucket/c10_1001 --dry-run
Extra flags after -- go to preact-train.
"""
import argparse

import common  # noqa: F401  (puts this checkout on sys.path)
from preact import launchers

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('action', choices=['create', 'setup', 'run', 'fetch', 'delete', 'all'])
p.add_argument('--name', required=True)
p.add_argument('--zone', required=True)
p.add_argument('--project', default='')
p.add_argument('--accelerator', default='v4-32')
p.add_argument('--version', default='tpu-ubuntu2204-base')
p.add_argument('--repo', default=common.origin_url(), help='git URL the workers clone')
p.add_argument('--ref', default='main')
p.add_argument('--config', default='')
p.add_argument('--workdir', default='', help='gs://bucket/path: shared by all workers')
p.add_argument('--local_dir', default='results')
p.add_argument('--dry-run', action='store_true', help='print the commands only')
args, extra = p.parse_known_args()
extra = [e for e in extra if e != '--']
try:
  cmds = launchers.tpu_commands(args.action, args.name, args.zone, args.config, args.workdir,
                                args.accelerator, args.version, args.project, args.repo,
                                args.ref, extra, args.local_dir)
except ValueError as e:
  common.fail(str(e))
raise SystemExit(launchers.execute(cmds, args.dry_run) and 1)
