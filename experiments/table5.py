"""Table 5: ImageNet single-crop error (top-1 / top-5), tested at 224 or 320.

Needs imagenet2012 prepared by TFDS (archives in --config.manual_dir).
  --config=experiments/table5.py:resnet200_preact_320 --config.manual_dir=/data/imagenet
"""

from preact.paper import Row, imagenet_recipe, table_config

_320 = {'augment.eval_resize': 320, 'augment.eval_crop': 320}
ROWS = {  # row: unit, top-1 %, top-5 %
    'resnet152_original_224': Row('original', 23.0, depth=152, error_top5=6.7),
    'resnet152_original_320': Row('original', 21.3, depth=152, error_top5=5.5, overrides=_320),
    'resnet152_preact_320': Row('full_preact', 21.1, depth=152, error_top5=5.5, overrides=_320),
    'resnet200_original_320': Row('original', 21.8, depth=200, error_top5=6.0, overrides=_320),
    'resnet200_preact_320': Row('full_preact', 20.7, depth=200, error_top5=5.3, overrides=_320),
    # With scale and aspect-ratio augmentation (Szegedy et al.).
    'resnet200_preact_scale_aspect_320': Row(
        'full_preact', 20.1, depth=200, error_top5=4.8,
        overrides={**_320, 'augment.imagenet': 'scale_aspect'}),
    # Sec. 4.1: BN after addition hurts on ImageNet too (ResNet-101).
    'resnet101_bn_after_addition': Row('bn_after_addition', 24.6, depth=101, error_top5=7.5),
    'resnet101_original': Row('original', 23.6, depth=101, error_top5=7.1),
}


def get_config(arg='resnet200_preact_320'):
  return table_config('table5', ROWS, arg, base_depth=200, recipe=imagenet_recipe)
