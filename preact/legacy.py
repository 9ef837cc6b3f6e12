"""Config keys as older versions spelled them, so that their run records still read.

Free of JAX and of the schema's defaults: ``preact-report`` reads records with it alone.
"""

from __future__ import annotations


def flatten(c, prefix: str = '') -> dict:
  """{'a': {'b': 1}} → {'a.b': 1}, for dicts and ConfigDicts alike."""
  out = {}
  for k, v in c.items():
    if hasattr(v, 'items'):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def migrate(flat: dict) -> dict:
  """A flattened config as this schema spells it."""
  flat = dict(flat)
  for key in ('model.remat', 'model.scan'):  # both were bools before 'auto'
    if isinstance(flat.get(key), bool):
      flat[key] = 'on' if flat[key] else 'off'
  if 'model.cpu_conv' in flat:
    flat['model.cpu_kernels'] = flat.pop('model.cpu_conv')
  if flat.get('model.cpu_kernels') == 'on':  # the XLA formulations, before oneDNN's
    flat['model.cpu_kernels'] = 'xla'
  if 'model.bottleneck' in flat or 'model.one_layer' in flat:  # two booleans before block
    bottleneck, one_layer = flat.pop('model.bottleneck', False), flat.pop('model.one_layer',
                                                                          False)
    flat['model.block'] = 'one_layer' if one_layer else 'bottleneck' if bottleneck else 'basic'
  return flat


def migrate_dict(d: dict) -> dict:
  """A saved config (nested dict) as this schema spells it, still nested."""
  out: dict = {}
  for key, value in migrate(flatten(d)).items():
    *parents, leaf = key.split('.')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out
