"""The one exception the command-line tools turn into a clean exit."""

import sys


class UserError(Exception):
  """Bad input from the user: a config, a flag, data, a checkpoint. The message is one
  line that says what is wrong and how to fix it; the CLI prints it and exits 2."""


def exit_on_user_error(tool: str):
  """Decorator for absl mains: UserError → one line on stderr and exit status 2."""
  def wrap(main):
    def run(argv):
      try:
        return main(argv)
      except UserError as e:
        print(f'{tool}: error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    return run
  return wrap
