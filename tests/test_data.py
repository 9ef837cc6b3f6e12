"""Input pipelines: real Fashion-MNIST offline, mocked CIFAR/ImageNet, determinism,
per-process sharding and exactly-once evaluation."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from preact import config as config_lib, data, imagenet
from preact.errors import UserError


@pytest.mark.slow
def test_fashion_mnist_is_prepared_offline_from_debian_files(fmnist_dir):
  train_x, train_y = data.load_arrays('fashion_mnist', 'train', fmnist_dir)
  test_x, test_y = data.load_arrays('fashion_mnist', 'test', fmnist_dir)
  assert train_x.shape == (60000, 28, 28, 1) and train_x.dtype == np.uint8
  assert test_x.shape == (10000, 28, 28, 1)
  assert np.bincount(test_y).tolist() == [1000] * 10
  assert np.bincount(train_y).tolist() == [6000] * 10
  # The regular TFDS builder reads what we prepared.
  b = tfds.builder('fashion_mnist', data_dir=fmnist_dir)
  assert b.is_prepared() and b.info.splits['train'].num_examples == 60000
  mean, std = data.channel_stats('fashion_mnist', fmnist_dir)
  np.testing.assert_allclose(mean, [72.94], atol=0.01)   # 0.2860 × 255
  np.testing.assert_allclose(std, [90.02], atol=0.01)    # 0.3530 × 255


@pytest.mark.parametrize('n', [500, 4200])  # 4200 images: two chunks of pixels
def test_pixel_stats_are_numpys_float64_mean_and_std(n):
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), np.uint8)
  images[..., 2] //= 7  # a skewed channel
  flat = images.reshape(-1, 3).astype(np.float64)
  mean, std = data.pixel_stats(images)
  assert mean.dtype == std.dtype == np.float32
  np.testing.assert_array_equal(mean, flat.mean(0).astype(np.float32))
  np.testing.assert_array_equal(std, flat.std(0).astype(np.float32))


def test_example_order_is_a_pure_function_of_seed_and_step():
  n, b = 10, 4
  stream = np.concatenate([data.example_indices(t, b, n, seed=3) for t in range(5)])
  # Consecutive epochs are permutations, batches straddle epoch ends.
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:20])
  np.testing.assert_array_equal(data.example_indices(3, b, n, 3), stream[12:16])
  assert not np.array_equal(data.example_indices(3, b, n, 4), stream[12:16])


def test_crop_and_flip_matches_a_hand_crop():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (3, 6, 5, 2), dtype=np.uint8)
  offsets = np.array([[0, 0], [4, 1], [2, 3]])
  flips = np.array([False, True, False])
  got = data.crop_and_flip(images, offsets, flips, padding=2, flip=True)
  for i in range(3):
    padded = np.pad(images[i], ((2, 2), (2, 2), (0, 0)))
    want = padded[offsets[i, 0]:offsets[i, 0] + 6, offsets[i, 1]:offsets[i, 1] + 5]
    np.testing.assert_array_equal(got[i], want[:, ::-1] if flips[i] else want)
  np.testing.assert_array_equal(data.crop_and_flip(images, offsets * 0 + 2, ~flips, 2, False),
                                images)


def test_processes_read_disjoint_slices_of_the_same_global_batch():
  with tfds.testing.mock_data(num_examples=50):
    whole = data.InMemory('cifar10', 16, seed=1)
    parts = [data.InMemory('cifar10', 16, seed=1, process_index=p, process_count=4)
             for p in range(4)]
    for step in (0, 3, 7):
      want = whole.batch(step)
      got = [p.batch(step) for p in parts]
      for key in ('image', 'label'):
        np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    assert whole.images.shape[1:] == (32, 32, 3)


def test_resumed_stream_equals_uninterrupted_stream():
  with tfds.testing.mock_data(num_examples=30):
    d = data.InMemory('cifar100', 8, seed=5)
    it = d.batches(0)
    first = [next(it) for _ in range(6)]
    resumed = d.batches(4)
    for want in first[4:]:
      got = next(resumed)
      np.testing.assert_array_equal(got['image'], want['image'])
    assert d.labels.max() < 100


@pytest.mark.parametrize('n,batch,procs', [(70, 32, 1), (70, 32, 4), (64, 32, 2), (5, 8, 8)])
def test_evaluation_sees_every_example_exactly_once(n, batch, procs):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  labels = np.arange(n, dtype=np.int32)
  seen = []
  for p in range(procs):
    for b in data.eval_batches(images, labels, batch, p, procs):
      assert len(b['image']) == batch // procs
      seen.extend(b['label'][b['mask'] > 0].tolist())
  assert sorted(seen) == list(range(n))


def test_unknown_dataset_is_a_user_error():
  with pytest.raises(UserError, match='valid datasets: cifar10, cifar100'):
    data.spec('mnist10')


def _imagenet_config(**aug):
  c = config_lib.base()
  c.dataset = 'imagenet2012'
  c.batch_size, c.eval_batch_size = 4, 4
  c.augment.image_size, c.augment.eval_resize, c.augment.eval_crop = 32, 36, 32
  c.augment.scale_range = (32, 48)
  for k, v in aug.items():
    c.augment[k] = v
  return c


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['scale', 'scale_aspect'])
def test_imagenet_stream_is_deterministic_and_resumable(mode):
  with tfds.testing.mock_data(num_examples=10):
    s = imagenet.Streaming(_imagenet_config(imagenet=mode))
    assert s.steps_per_epoch == 2
    it = s.batches(0)
    first = [next(it) for _ in range(5)]  # crosses two epoch ends
    assert first[0]['image'].shape == (4, 32, 32, 3) and first[0]['image'].dtype == np.uint8
    again = s.batches(3)
    np.testing.assert_array_equal(next(again)['image'], first[3]['image'])
    np.testing.assert_array_equal(next(again)['label'], first[4]['label'])
    # The next epoch is a different shuffle of the same examples.
    assert not np.array_equal(first[0]['image'], first[2]['image'])


def test_imagenet_eval_covers_every_example_once():
  with tfds.testing.mock_data(num_examples=10):
    c = _imagenet_config()
    batches = list(imagenet.eval_batches(c, 'validation'))
    assert len(batches) == 3 and sum(float(b['mask'].sum()) for b in batches) == 10
    assert batches[-1]['mask'].tolist() == [1, 1, 0, 0]
    # Processes read their own even split; all yield the same number of batches so that
    # the collectives line up. (The mock ignores split slicing, so only counts are checked.)
    c.eval_batch_size = 8
    counts = [len(list(imagenet.eval_batches(c, 'validation', p, 2))) for p in range(2)]
    assert counts == [2, 2]


def test_a_split_is_decoded_once_and_then_read_from_beside_tfds_files(fmnist_dir):
  path = data._decoded_path(data.builder('fashion_mnist', fmnist_dir), 'test')
  if os.path.exists(path):
    os.remove(path)
  data.load_arrays.cache_clear()
  decoded = data.load_arrays('fashion_mnist', 'test', fmnist_dir)  # through tf.data
  assert os.path.exists(path)
  data.load_arrays.cache_clear()
  kept = data.load_arrays('fashion_mnist', 'test', fmnist_dir)
  for a, b in zip(decoded, kept):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert decoded[0].shape == (10_000, 28, 28, 1)
  with tfds.testing.mock_data(num_examples=4):  # mocked data is never kept
    assert data._decoded_path(data.builder('cifar10'), 'train') is None
