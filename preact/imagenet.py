"""ImageNet input: tf.data over this process's share of the files, deterministic in
(seed, step) like the in-memory pipelines.

Epoch e reads the process's split with files and examples shuffled by seeds drawn
from (seed, e), and each example's crop is drawn by stateless ops from (seed, e, its
position), so the stream is a pure function of the seed. Resuming at step t re-creates
epoch t // steps_per_epoch and skips the records already consumed, before decoding.

Augmentation (config.augment.imagenet): 'scale', the paper's scale augmentation
(shorter side resized to a random length in scale_range, a random 224 crop, flip), or
'scale_aspect', which adds aspect-ratio jitter (random-resized crop over area_range and
aspect_range, Szegedy et al.) as in the paper's last ResNet-200 row. Evaluation
resizes the shorter side to eval_resize and takes the central eval_crop (224, or 320
for the paper's 320 test).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from preact import data


def _tf():
  import tensorflow as tf
  return tf


def _process_split(split: str, index: int, count: int) -> str:
  import tensorflow_datasets as tfds
  return tfds.even_splits(split, n=count, drop_remainder=False)[index]


def _num_examples(b, split: str) -> int:
  try:
    n = b.info.splits[split].num_examples
  except (KeyError, ValueError):
    n = 0
  if not n:  # mocked or unrecorded: count
    n = sum(1 for _ in b.as_dataset(split=split, decoders=_skip_decoding()))
  return n


def _skip_decoding():
  import tensorflow_datasets as tfds
  return {'image': tfds.decode.SkipDecoding()}


def _resize_shorter(tf, image, size):
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  return tf.image.resize(image, new, method='bilinear', antialias=True)


def _to_uint8(tf, image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def train_augment(encoded, seed, aug):
  """One training example from JPEG bytes; ``seed`` is a stateless [2] int seed."""
  tf = _tf()
  seeds = tf.random.experimental.stateless_split(seed, 4)
  size = aug.image_size
  if aug.imagenet == 'scale_aspect':
    shape = tf.image.extract_jpeg_shape(encoded)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([1, 0, 4], tf.float32), seed=seeds[0], min_object_covered=0.0,
        aspect_ratio_range=tuple(aug.aspect_range), area_range=tuple(aug.area_range),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  else:
    image = tf.image.decode_jpeg(encoded, channels=3)
    lo, hi = aug.scale_range
    shorter = tf.random.stateless_uniform([], seeds[1], lo, hi + 1, dtype=tf.int32)
    image = _resize_shorter(tf, image, shorter)
    image = tf.image.stateless_random_crop(image, (size, size, 3), seeds[2])
  if aug.flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[3])
  return _to_uint8(tf, image)


def eval_preprocess(encoded, aug):
  tf = _tf()
  image = _resize_shorter(tf, tf.image.decode_jpeg(encoded, channels=3), aug.eval_resize)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  c = aug.eval_crop
  image = tf.image.crop_to_bounding_box(image, (h - c) // 2, (w - c) // 2, c, c)
  return _to_uint8(tf, image)


class Streaming:
  """The training stream of one process; ``batches(t)`` starts at global step t."""

  def __init__(self, config, process_index: int = 0, process_count: int = 1):
    self.config = config
    self.builder = data.builder('imagenet2012', config.data_dir, config.manual_dir)
    self.split = _process_split('train', process_index, process_count)
    self.local = config.batch_size // process_count
    self.num_examples = _num_examples(self.builder, self.split)
    self.steps_per_epoch = max(self.num_examples // self.local, 1)

  def _epoch(self, epoch: int, skip: int):
    import tensorflow_datasets as tfds
    tf = _tf()
    seed = int(np.random.default_rng([self.config.seed, epoch, 2]).integers(2**31))
    ds = self.builder.as_dataset(
        split=self.split, shuffle_files=True, decoders=_skip_decoding(),
        read_config=tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16,
                                    interleave_block_length=1))
    ds = ds.shuffle(16 * self.local, seed=seed, reshuffle_each_iteration=False)
    ds = ds.skip(skip).enumerate(start=skip)
    aug = self.config.augment

    def prep(i, ex):
      s = tf.stack([tf.constant(seed, tf.int64), i])
      return {'image': train_augment(ex['image'], s, aug),
              'label': tf.cast(ex['label'], tf.int32)}
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).with_options(options)
    return ds.batch(self.local, drop_remainder=True).prefetch(2)

  def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    import tensorflow_datasets as tfds
    epoch, done = divmod(start_step, self.steps_per_epoch)
    skip = done * self.local
    while True:
      yield from tfds.as_numpy(self._epoch(epoch, skip))
      epoch, skip = epoch + 1, 0


def eval_batches(config, split: str, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of the split, every example once; all processes yield the
  same number of batches (the last ones padded with mask 0) so collectives line up."""
  import tensorflow_datasets as tfds
  tf = _tf()
  b = data.builder('imagenet2012', config.data_dir, config.manual_dir)
  total = _num_examples(b, split)
  local = config.eval_batch_size // process_count
  n_batches = math.ceil(math.ceil(total / process_count) / local)
  ds = b.as_dataset(split=_process_split(split, process_index, process_count),
                    shuffle_files=False, decoders=_skip_decoding())
  ds = ds.map(lambda ex: {'image': eval_preprocess(ex['image'], config.augment),
                          'label': tf.cast(ex['label'], tf.int32),
                          'mask': tf.constant(1.0, tf.float32)},
              num_parallel_calls=tf.data.AUTOTUNE)
  c = config.augment.eval_crop
  pad = tf.data.Dataset.from_tensors({'image': tf.zeros((c, c, 3), tf.uint8),
                                      'label': tf.constant(0, tf.int32),
                                      'mask': tf.constant(0.0, tf.float32)}).repeat()
  ds = ds.concatenate(pad).batch(local).take(n_batches)
  yield from tfds.as_numpy(ds)
