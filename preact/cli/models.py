"""preact-models: every registered unit variant and network, with size and FLOPs.

  preact-models                        # the table
  preact-models --json                 # the same, one JSON list
  preact-models --units=full_preact,original --depths=164,1001
"""

from __future__ import annotations

import json

from absl import flags

from preact import models, units
from preact.cli import common

CIFAR_DEPTHS = (20, 56, 110, 164, 1001, 1202)
IMAGENET_DEPTHS = (50, 152, 200)

_JSON = flags.DEFINE_bool('json', False, 'Print one JSON list instead of a table.')
_UNITS = flags.DEFINE_list('units', list(units.UNITS), 'Unit variants to list.')
_DEPTHS = flags.DEFINE_list('depths', None, 'CIFAR and/or ImageNet depths '
                            f'(default: CIFAR {CIFAR_DEPTHS}, ImageNet {IMAGENET_DEPTHS}).')
_ARCH = flags.DEFINE_enum('arch', 'all', ['all', 'cifar', 'imagenet'], 'Which networks.')


def _fits(depth: int) -> list[str]:
  """The blocks a CIFAR net of this depth can be built of."""
  fits = []
  for block in models.CIFAR_BLOCKS:
    try:
      models.cifar_stages(depth, block)
      fits.append(block)
    except ValueError:
      pass
  return fits


def rows(unit_names, cifar_depths, imagenet_depths):
  """Yields one dict per (network, unit variant); CIFAR nets in every block the depth fits."""
  for depth in cifar_depths:
    for block in _fits(depth):
      for unit in unit_names:
        model = models.cifar_resnet(depth, unit, block)
        yield _row('cifar', depth, unit, model, (32, 32, 3), 10)
  for depth in imagenet_depths:
    for unit in unit_names:
      yield _row('imagenet', depth, unit, models.imagenet_resnet(depth, unit), (224, 224, 3),
                 1000)


def _row(arch, depth, unit, model, image_shape, classes):
  params, flops = models.size_and_flops(model, image_shape)
  return dict(arch=arch, depth=depth, unit=unit, block=model.block, params=params,
              flops=flops, image_shape=list(image_shape), num_classes=classes)


@common.main('preact-models')
def main(argv):
  common.no_arguments(argv)
  try:
    for u in _UNITS.value:
      units.get_unit(u)
    depths = [int(d) for d in _DEPTHS.value] if _DEPTHS.value else None
  except ValueError as e:
    raise common.UserError(str(e)) from None
  cifar = [d for d in depths if d not in models.IMAGENET_NETS or d in CIFAR_DEPTHS] \
      if depths else CIFAR_DEPTHS
  imnet = [d for d in depths if d in models.IMAGENET_NETS] if depths else IMAGENET_DEPTHS
  cifar = [] if _ARCH.value == 'imagenet' else cifar
  imnet = [] if _ARCH.value == 'cifar' else imnet
  if depths and not cifar and not imnet:
    raise common.UserError(f'no {_ARCH.value} network has depth '
                           f'{", ".join(map(str, depths))}; ImageNet depths: '
                           f'{", ".join(map(str, models.IMAGENET_NETS))}')
  bad = [d for d in cifar if not _fits(d)]
  if bad:
    forms = ', '.join(form for _, form, *_ in models.CIFAR_BLOCKS.values())
    raise common.UserError(f'depth {bad[0]} fits no CIFAR unit ({forms}) and is no '
                           f'ImageNet depth ({", ".join(map(str, models.IMAGENET_NETS))})')
  if _JSON.value:
    print(json.dumps(list(rows(_UNITS.value, cifar, imnet))))
    return
  header = f'{"net":<10} {"depth":>5} {"block":<10} {"unit":<22} {"params":>12} {"GFLOPs":>9}'
  print(header)
  print('-' * len(header))
  for r in rows(_UNITS.value, cifar, imnet):
    print(f'{r["arch"]:<10} {r["depth"]:>5} {r["block"]:<10} {r["unit"]:<22} '
          f'{r["params"]:>12,} {r["flops"] / 1e9:>9.3f}', flush=True)


def run():
  common.run(main)


if __name__ == '__main__':
  run()
