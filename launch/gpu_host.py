#!/usr/bin/env python3
"""One multi-GPU host: preact-train over all its GPUs (one process, all local devices), here or on HOST via ssh.

  python launch/gpu_host.py --config=experiments/table2.py:full_preact,depth=164 \
      --workdir=runs/t2_fp164 [--host=gpu7] [--gpus=0,1] [--dry-run] [-- --config.seed=1]
"""
import argparse

import common  # noqa: F401
from preact import launchers

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--config', required=True)
p.add_argument('--workdir', required=True)
p.add_argument('--host', default='', help='run there over ssh (default: here)')
p.add_argument('--gpus', default='', help='CUDA_VISIBLE_DEVICES (default: all)')
p.add_argument('--repo_dir', default='preact', help='the checkout on HOST')
p.add_argument('--dry-run', action='store_true')
args, extra = p.parse_known_args()
extra = [e for e in extra if e != '--']
cmds = launchers.gpu_host_commands(args.config, args.workdir, args.host, args.gpus, extra,
                                   args.repo_dir)
raise SystemExit(launchers.execute(cmds, args.dry_run) and 1)
