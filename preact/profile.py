"""Where a train step's time goes, per op and per kind of op, for ours and for PyTorch.

Ours: the compiled step runs under ``jax.profiler``; XLA:CPU records one event per
executed HLO op (fusion, convolution, dot, copy...), also for every trip of a scanned
loop, and each is charged its share of the step's wall time (:func:`wall_time_by_op`).
Each op is put in a kind by what the compiled HLO says of it: what it computes
(a convolution or dot, a reduction, a copy) and where its metadata says it came from
(a BatchNorm or Conv module; ``transpose(jvp(...))`` marks the backward pass; no
``jvp`` at all is the optimizer). PyTorch's step is cut into the same kinds by
``torch.profiler`` (see ``bench_torch.torch_kind``), so the two columns line up.
"""

from __future__ import annotations

import collections
import functools
import glob
import heapq
import re
import tempfile

import jax

# The kinds, in the order they are printed; both frameworks use these names.
KINDS = ('conv 3x3 fwd', 'conv 3x3 bwd', 'conv 1x1 fwd', 'conv 1x1 bwd',
         'batch norm fwd', 'batch norm bwd', 'relu, add, other fwd', 'relu, add, other bwd',
         'copies, layout, scan', 'loss, optimizer, rest')

_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'(?:calls|to_apply|body)=%([\w.\-]+)')
_WINDOW = re.compile(r'window=\{size=(\d+)x(\d+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_SHAPE = re.compile(r'\[(\d+),(\d+),\d+,\d+\]')
_OPERAND_TYPES = re.compile(r'operand_layout_constraints=\{(.*?)\}, \w+=')
_DATA_MOVEMENT = {'copy', 'transpose', 'dynamic-slice', 'dynamic-update-slice', 'bitcast',
                  'concatenate', 'slice', 'pad', 'reverse', 'broadcast', 'tuple',
                  'get-tuple-element', 'parameter', 'constant', 'iota', 'reshape'}
_CONTROL = {'while', 'call', 'conditional'}  # their events enclose their bodies' events


def hlo_kinds(hlo_text: str) -> dict[str, tuple[str | None, str]]:
  """Maps every instruction of a compiled HLO module to (one of KINDS, what it is: its
  output type and source). Control flow maps to None: the ops inside it count instead."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = computations.setdefault(m.group(1), [])
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      name, shape, opcode, rest = m.groups()
      op_name = _OP_NAME.search(rest)
      window = _WINDOW.search(rest) or _SHAPE.search(_ffi_conv_kernel(shape, rest))
      target = _TARGET.search(rest)
      if target:  # an FFI kernel (preact.onednn) is its own kind of op
        opcode = target.group(1)
      current.append(dict(name=name, opcode=opcode, shape=shape, calls=_CALLS.findall(rest),
                          op_name=op_name.group(1) if op_name else '',
                          window=window.groups() if window else None))

  def contents(instr):
    """The opcodes an instruction executes, through fusions ('window': a k×k conv)."""
    found = {instr['opcode']}
    if instr['window'] and instr['window'] != ('1', '1'):
      found.add('window')
    if instr['opcode'] not in _CONTROL:
      for c in instr['calls']:
        found |= inside(c)
    return found

  @functools.cache
  def inside(computation):
    return frozenset().union(*(contents(i) for i in computations.get(computation, [])))

  kinds = {}
  for instrs in computations.values():
    for instr in instrs:
      path = instr['op_name']
      # The source without jit/jvp/loop wrappers: module path and primitive.
      source = '/'.join(p for p in path.split('/') if '(' not in p and p not in
                        ('while', 'body', 'closed_call') and not p.endswith('<lambda>'))
      kinds[instr['name']] = (_kind(instr, contents(instr)),
                              f"{instr['shape']} {source or '(made by XLA)'}")
  return kinds


def _ffi_conv_kernel(shape: str, rest: str) -> str:
  """A oneDNN conv's HWIO kernel type: the second operand (forward, backward-data) or
  the result (backward-weights); '' for other ops."""
  if 'preact_onednn_conv' not in rest:
    return ''
  if 'bwd_weights' in rest:
    return shape
  operands = _OPERAND_TYPES.search(rest)
  return re.findall(r'\w+\[[\d,]*\]', operands.group(1))[1] if operands else ''


def _kind(instr, ops) -> str | None:
  path = instr['op_name']
  direction = 'bwd' if 'transpose(' in path else 'fwd'
  if instr['opcode'] in _CONTROL:
    return None
  if instr['opcode'].startswith('preact_onednn_'):
    direction = 'bwd' if '_bwd' in instr['opcode'] else 'fwd'
    if '_conv_' in instr['opcode']:
      return f"conv {'3x3' if 'window' in ops else '1x1'} {direction}"
    return f'batch norm {direction}'
  if ops <= _DATA_MOVEMENT | {'fusion'}:
    return 'copies, layout, scan'
  if 'jvp(' not in path:
    return 'loss, optimizer, rest'
  if ops & {'convolution', 'dot'} and '/Dense' not in path:
    return f"conv {'3x3' if 'window' in ops else '1x1'} {direction}"
  if '/BatchNorm' in path:
    return f'batch norm {direction}'
  if '/Dense' in path or 'log_softmax' in path or 'reduce_mean' in path:
    return 'loss, optimizer, rest'
  return f'relu, add, other {direction}'


def table(out: dict) -> str:
  """``preact-bench --mode=profile``'s output as text: kinds side by side, then our
  costliest ops."""
  ours, ref = out['ours'], out.get('torch', {})
  theirs = ref.get('ms_by_kind', {})
  rows = [f"{'kind of op':<24} {'ours ms':>9} {'PyTorch ms':>11} {'ours/PyTorch':>13}"]
  for kind, ms in ours['ms_by_kind'].items():
    t = theirs.get(kind, 0.0)
    ratio = f'{ms / t:13.2f}' if t else f"{'-':>13}"
    rows.append(f'{kind:<24} {ms:9.0f} {t:11.0f} {ratio}')
  rows.append(f"{'all ops (sum)':<24} {ours['op_ms_total']:9.0f} {sum(theirs.values()):11.0f}")
  if 'op_ms_raw' in ours:
    rows.append(f"{'  (ours, overlaps kept)':<24} {ours['op_ms_raw']:9.0f}")
  rows.append(f"{'step (wall)':<24} {ours['step_ms']:9.0f} {ref.get('step_ms', 0.0):11.0f}")
  if 'traced_step_ms' in ours:
    rows.append(f"{'  (ours, traced)':<24} {ours['traced_step_ms']:9.0f}")
  rows += ['', 'our costliest ops (ms per step):']
  rows += [f"{o['ms']:8.1f}  {o['kind']:<22} {o['about']}" for o in ours['top_ops']]
  return '\n'.join(rows)


def wall_time_by_op(events) -> collections.Counter:
  """Each op's share of the wall time: (name, start, end) events, possibly overlapping,
  in; every instant at which any op is open goes to the open op that ends first.

  XLA:CPU runs independent ops on several threads, and an op's event may also open
  before the op gets a core (measured: events of a chain of dependent ops summing to
  2.5 times the step). Charging each instant once, to the op that closes first (the one
  running, not the one waiting on it; of two closing together, the one that opened
  later, which ran inside the other), makes the ops' times add up to the time the step
  spent in them."""
  bounds = sorted({t for _, start, end in events for t in (start, end)})
  starts = collections.defaultdict(list)
  for name, start, end in events:
    starts[start].append((end, -start, name))
  share, open_ops = collections.Counter(), []
  for t, t_next in zip(bounds, bounds[1:]):
    for item in starts.get(t, ()):
      heapq.heappush(open_ops, item)
    while open_ops and open_ops[0][0] <= t:
      heapq.heappop(open_ops)
    if open_ops:
      share[open_ops[0][2]] += t_next - t
  return share


def _traced_events(kinds, run, steps):
  """(name, start, end) of every op with a kind over ``steps`` traced calls of ``run``,
  and how many executed ops ``kinds`` does not know."""
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      jax.block_until_ready(run())
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f'{tmp}/**/*.xplane.pb', recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
  events, unknown = [], 0
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:
          if kinds[event.name][0] is not None:
            events.append((event.name, event.start_ns, event.start_ns + event.duration_ns))
        elif any(k == 'hlo_op' for k, _ in event.stats):
          unknown += 1  # an executed op this module does not have: must stay 0
  return events, unknown


def profile_step(hlo_text: str, run, steps: int = 2, top: int = 25, attempts: int = 3) -> dict:
  """Calls ``run()`` (one step of the compiled module ``hlo_text``; returns something to
  wait on) ``steps`` times under the profiler, ``attempts`` times over, and keeps the
  fastest attempt: on 2 cores a traced step now and then runs up to 2.5 times slower
  than an untraced one (likely the profiler's thread taking a core from oneDNN's thread
  team). Returns per-step ms by kind
  and per op, each op charged its share of the wall time (:func:`wall_time_by_op`); the
  traced step's wall time; and the ops' own durations summed (``op_ms_raw``, more than
  the step where they overlap)."""
  kinds = hlo_kinds(hlo_text)
  span = lambda events: max(e for *_, e in events) - min(s for _, s, _ in events)
  events, unknown = min((_traced_events(kinds, run, steps) for _ in range(attempts)),
                        key=lambda traced: span(traced[0]) if traced[0] else float('inf'))
  per_op = wall_time_by_op(events)
  by_kind = collections.Counter()
  for name, ns in per_op.items():
    by_kind[kinds[name][0]] += ns / 1e6 / steps
  return dict(ms_by_kind={k: by_kind.get(k, 0.0) for k in KINDS},
              op_ms_total=sum(by_kind.values()), unknown_ops=unknown,
              op_ms_raw=sum(end - start for _, start, end in events) / 1e6 / steps,
              traced_step_ms=span(events) / 1e6 / steps if events else 0.0,
              top_ops=[dict(op=n, kind=kinds[n][0], ms=ns / 1e6 / steps, about=kinds[n][1])
                       for n, ns in per_op.most_common(top)])
