"""The one exception the command-line tools turn into a clean exit."""

import re


class UserError(Exception):
  """Bad input from the user: a config, a flag, data, a checkpoint. The message is one
  line that says what is wrong and how to fix it; the CLI prints it and exits 2."""


def one_line(e: BaseException) -> str:
  """An exception's message on one line, without the quoting KeyError adds."""
  text = str(e).replace("\\'", "'").replace('\\n', ' ').replace('\n', ' ').strip(' "')
  text = re.sub(r"^'+([^']*)'+", r'\1', text).rstrip("'")
  return ' '.join(text.split()) or e.__class__.__name__
