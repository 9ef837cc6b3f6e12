"""Shared flags of the launch scripts (they import preact from this checkout)."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def origin_url() -> str:
  """This checkout's git remote, the default for what remote hosts clone."""
  try:
    return subprocess.run(['git', 'remote', 'get-url', 'origin'], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''


def fail(message: str):
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(2)
