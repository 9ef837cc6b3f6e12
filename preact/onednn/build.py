"""Compiles ``onednn_ffi.cc`` into ``_onednn_ffi.so`` next to it.

    python -m preact.onednn.build [--force]

Prints one line saying what it built, or why not. Exit status 0 when the library is
built (or already up to date), 1 when oneDNN's headers are missing, 2 on a compiler
error. Needs g++ (C++17), oneDNN 2.x (Debian: ``apt-get install libdnnl-dev``) and jaxlib's
FFI headers (``jax.ffi.include_dir()``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / 'onednn_ffi.cc'
LIBRARY = HERE / '_onednn_ffi.so'
DNNL_HEADER = 'oneapi/dnnl/dnnl.hpp'
INCLUDE_DIRS = ('/usr/include', '/usr/local/include')


def up_to_date() -> bool:
  return LIBRARY.exists() and LIBRARY.stat().st_mtime >= SOURCE.stat().st_mtime


def _dnnl_include() -> pathlib.Path | None:
  roots = [os.environ.get('DNNL_ROOT', ''), os.environ.get('CONDA_PREFIX', '')]
  candidates = [pathlib.Path(r) / 'include' for r in roots if r]
  candidates += [pathlib.Path(d) for d in INCLUDE_DIRS]
  return next((c for c in candidates if (c / DNNL_HEADER).exists()), None)


def command() -> list[str] | str:
  """The compiler command line, or a string saying why there is none."""
  import jax.ffi
  dnnl = _dnnl_include()
  if dnnl is None:
    return f'oneDNN headers ({DNNL_HEADER}) not found: apt-get install libdnnl-dev'
  jax_include = pathlib.Path(jax.ffi.include_dir())
  if not (jax_include / 'xla' / 'ffi' / 'api' / 'ffi.h').exists():
    return f'XLA FFI headers not found under {jax_include}'
  cxx = os.environ.get('CXX', 'g++')
  if shutil.which(cxx) is None:
    return f'no C++ compiler ({cxx}) on PATH'
  cmd = [cxx, '-O3', '-std=c++17', '-shared', '-fPIC',
         f'-I{jax_include}', f'-I{dnnl}', str(SOURCE), '-o', str(LIBRARY)]
  if dnnl.parent != pathlib.Path('/usr'):
    lib = dnnl.parent / 'lib'
    cmd += [f'-L{lib}', f'-Wl,-rpath,{lib}']
  return cmd + ['-ldnnl']


def build(force: bool = False) -> tuple[bool, str]:
  """(built or up to date, one line saying what happened)."""
  if not force and up_to_date():
    return True, f'{LIBRARY} is up to date'
  cmd = command()
  if isinstance(cmd, str):
    return False, cmd
  tmp = LIBRARY.with_suffix('.so.tmp')
  cmd[cmd.index(str(LIBRARY))] = str(tmp)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    tmp.unlink(missing_ok=True)
    sys.stderr.write(proc.stderr)
    return False, f'compiler error building {LIBRARY.name} (exit {proc.returncode})'
  os.replace(tmp, LIBRARY)  # atomic: a concurrent loader never sees half a file
  return True, f'built {LIBRARY}'


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ok, line = build(force='--force' in argv)
  print(line)
  if ok:
    return 0
  return 2 if line.startswith('compiler error') else 1


if __name__ == '__main__':
  sys.exit(main())
