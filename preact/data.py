"""Input pipelines: TFDS datasets, the paper's augmentation, deterministic order.

Every batch is a pure function of (seed, step): the training stream is the
concatenation of per-epoch permutations drawn from (seed, epoch), and the random crop
and flip of batch t are drawn from (seed, t) for the whole global batch before each
process takes its slice. A resumed run therefore sees exactly the batches an
uninterrupted one would, on any number of devices or hosts.

Small datasets (CIFAR, Fashion-MNIST) are held in host memory as uint8; ImageNet streams
through tf.data from per-process file shards. Batches leave the host as uint8 and are
normalized on the device (:func:`normalize`), which moves a quarter of the bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import queue
import threading
from typing import Callable, Iterator

import numpy as np

from preact.errors import UserError, one_line

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


class InMemoryPipeline:
  """Data sets that fit in host memory: every split as numpy arrays on every host, the
  train batches drawn by :class:`InMemory`, evaluation by :func:`eval_batches`."""

  @staticmethod
  def train(config, process_index: int, process_count: int):
    return InMemory(config.dataset, config.batch_size, config.seed,
                    config.augment.crop_padding, config.augment.flip, config.data_dir,
                    process_index, process_count)

  @staticmethod
  def evaluation(config, split: str, process_index: int = 0, process_count: int = 1):
    images, labels = load_arrays(config.dataset, split, config.data_dir)
    return eval_batches(images, labels, config.eval_batch_size, process_index,
                        process_count)

  @staticmethod
  def image_shape(config) -> tuple[int, ...]:
    return load_arrays(config.dataset, 'train', config.data_dir)[0].shape[1:]


class StreamingPipeline:
  """Data sets too large for host memory (ImageNet): tf.data over per-process shards,
  with the paper's augmentation (:mod:`preact.imagenet`)."""

  @staticmethod
  def train(config, process_index: int, process_count: int):
    from preact import imagenet
    return imagenet.Streaming(config, process_index, process_count)

  @staticmethod
  def evaluation(config, split: str, process_index: int = 0, process_count: int = 1):
    from preact import imagenet
    return imagenet.eval_batches(config, split, process_index, process_count)

  @staticmethod
  def image_shape(config) -> tuple[int, ...]:
    return (config.augment.image_size,) * 2 + (3,)


@dataclasses.dataclass(frozen=True)
class Spec:
  num_classes: int
  train_examples: int
  mean: tuple[float, ...] | None  # per channel, 0–255 scale; None: computed from train
  std: tuple[float, ...] | None
  pipeline: type = InMemoryPipeline  # how batches are made: train, evaluation, image_shape
  eval_split: str = 'test'
  # Where TFDS downloads it from (host, port), checked before a download so that an
  # offline machine fails in seconds; None: prepared from local files (manual_dir).
  source: tuple[str, int] | None = None
  # prepare(data_dir, manual_dir) → whether it prepared the data set from local files
  # (no download); tried before TFDS's own download.
  prepare: Callable[[str | None, str], bool] | None = None
  hint: str = ''  # what to do when it cannot be prepared


def _fashion_mnist_from_files(data_dir: str | None, manual_dir: str) -> bool:
  """Prepares fashion_mnist from local copies of the upstream files (manual_dir, or
  Debian's dataset-fashion-mnist package) when there are any."""
  import tensorflow_datasets as tfds
  source = manual_dir or DEBIAN_FASHION_MNIST
  if not os.path.exists(os.path.join(source, 'train-images-idx3-ubyte.gz')):
    return False
  local = _fashion_mnist_from_files_cls()(data_dir=data_dir)
  local.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source))
  return True


DATASETS = {
    # fb.resnet.torch's constants (datasets/cifar10.lua, cifar100.lua), 0–255 scale.
    'cifar10': Spec(10, 50_000, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7),
                    source=('www.cs.toronto.edu', 443)),
    'cifar100': Spec(100, 50_000, (129.3, 124.1, 112.4), (68.2, 65.4, 70.4),
                     source=('www.cs.toronto.edu', 443)),
    'fashion_mnist': Spec(10, 60_000, None, None,
                          source=('fashion-mnist.s3-website.eu-central-1.amazonaws.com', 80),
                          prepare=_fashion_mnist_from_files,
                          hint='apt-get install dataset-fashion-mnist gives the offline copy'),
    'imagenet2012': Spec(1000, 1_281_167, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375),
                         pipeline=StreamingPipeline, eval_split='validation',
                         hint='imagenet2012 needs its archives in --config.manual_dir'),
}


def first_examples(config, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` examples of a split, as evaluation sees them (unaugmented)."""
  images, labels, have = [], [], 0
  for b in spec(config.dataset).pipeline.evaluation(config, split):
    keep = b['mask'] > 0
    images.append(b['image'][keep])
    labels.append(b['label'][keep])
    have += int(keep.sum())
    if have >= n:
      break
  return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def spec(name: str) -> Spec:
  if name not in DATASETS:
    raise UserError(f'unknown dataset {name!r}; valid datasets: {", ".join(DATASETS)}')
  return DATASETS[name]


# --------------------------------------------------------------------------------------
# TFDS builders, including Fashion-MNIST from Debian's files.


def _fashion_mnist_from_files_cls():
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist

  class LocalFiles:
    """A download manager stand-in that extracts local copies instead of downloading."""

    def __init__(self, dl_manager):
      self._dl = dl_manager

    def download_and_extract(self, urls):
      return self._dl.extract({k: os.path.join(self._dl.manual_dir, os.path.basename(u))
                               for k, u in urls.items()})

  class FashionMnistFromFiles(mnist.FashionMNIST, skip_registration=True):
    """TFDS's own fashion_mnist builder, fed from local copies of the upstream files.

    Debian recompressed the .gz files, so TFDS's registered checksums (which are of
    the compressed files) do not match, while the decompressed images and labels are
    upstream's. Extracting the local files skips the download and its checksum; the
    result is the regular `fashion_mnist` dataset in data_dir, which TFDS's registered
    builder then reads like any other.
    """
    name = 'fashion_mnist'
    MANUAL_DOWNLOAD_INSTRUCTIONS = f'The four .gz files of Fashion-MNIST, as in {DEBIAN_FASHION_MNIST}.'

    def _split_generators(self, dl_manager):
      return super()._split_generators(LocalFiles(dl_manager))

  del tfds
  return FashionMnistFromFiles


def builder(name: str, data_dir: str = '', manual_dir: str = ''):
  """A prepared TFDS builder; prepares it (offline where possible) when it is not."""
  import tensorflow_datasets as tfds
  data_dir = data_dir or None
  try:
    b = tfds.builder(name, data_dir=data_dir)
    if b.is_prepared():
      return b
    hook = DATASETS[name].prepare if name in DATASETS else None
    if hook is not None and hook(data_dir, manual_dir):
      return tfds.builder(name, data_dir=data_dir)
    if not _mocked(b):
      _check_reachable(name, data_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    b.download_and_prepare(download_config=config)
    return b
  except UserError:
    raise
  except (PermissionError, OSError) as e:
    raise UserError(f'cannot use TFDS data_dir {data_dir or "(default)"} for {name}: '
                    f'{e.__class__.__name__}: {one_line(e)[:300]}; pass a readable, writable '
                    '--config.data_dir') from None
  except Exception as e:  # noqa: BLE001 — download and prepare errors come in many types
    hint = f' ({DATASETS[name].hint})' if name in DATASETS and DATASETS[name].hint else ''
    raise UserError(f'{name} is not prepared in {data_dir or "TFDS default data_dir"} and '
                    f'could not be prepared: {one_line(e)[:300]}{hint}; run `tfds build {name}` '
                    'where the network is reachable, or point --config.data_dir at a '
                    'prepared copy') from None


def _check_reachable(name: str, data_dir: str | None, timeout: float = 5.0) -> None:
  """Fails in seconds, with the remedy, where TFDS would retry a download for minutes."""
  import socket
  source = DATASETS[name].source if name in DATASETS else None
  if source is None:
    return
  try:
    socket.create_connection(source, timeout=timeout).close()
  except OSError as e:
    raise UserError(
        f'{name} is not prepared in {data_dir or "the TFDS default data_dir"} and its '
        f'source {source[0]} is unreachable ({e.__class__.__name__}); prepare it where the '
        f'network is reachable (`tfds build {name} --data_dir=DIR`), copy DIR here and pass '
        '--config.data_dir=DIR') from None


@functools.lru_cache(maxsize=8)
def load_arrays(name: str, split: str, data_dir: str = '') -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (uint8 images NHWC, int32 labels), in TFDS's stored order.

  Decoded once: the arrays are kept beside TFDS's files of the prepared version
  (``preact-<split>.npz``), since decoding 60,000 images through tf.data takes seconds
  at every start. Not under ``tfds.testing.mock_data``, and not on remote paths."""
  b = builder(name, data_dir)
  cached = _decoded_path(b, split)
  if cached and os.path.exists(cached):
    with np.load(cached) as z:
      return z['images'], z['labels']
  images, labels = _decode(b, name, split, data_dir)
  if cached:
    try:  # a read-only data_dir only costs the decoding next time
      tmp = f'{cached}.{os.getpid()}.tmp'
      with open(tmp, 'wb') as f:
        np.savez(f, images=images, labels=labels)
      os.replace(tmp, cached)
    except OSError:
      pass
  return images, labels


def _mocked(b) -> bool:
  """Under tfds.testing.mock_data, which swaps download_and_prepare for a no-op."""
  return type(b).download_and_prepare.__name__ != 'download_and_prepare'


def _decoded_path(b, split: str) -> str | None:
  where = str(b.data_dir)
  if _mocked(b) or '://' in where or not os.path.isdir(where):
    return None
  return os.path.join(where, 'preact-' + ''.join(
      ch if ch.isalnum() else '_' for ch in split) + '.npz')


def _decode(b, name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds
  try:
    chunks = list(tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False).batch(10_000)))
  except Exception as e:  # noqa: BLE001
    raise UserError(f'cannot read split {split!r} of {name} in '
                    f'{data_dir or "TFDS default data_dir"}: {one_line(e)[:300]}') from None
  if not chunks:
    raise UserError(f'{name}/{split} in {data_dir or "TFDS default data_dir"} is empty; '
                    're-prepare it in a fresh --config.data_dir')
  images = np.concatenate([c['image'] for c in chunks]).astype(np.uint8)
  labels = np.concatenate([c['label'] for c in chunks]).astype(np.int32)
  if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
    raise UserError(f'{name}/{split} has unexpected contents: images {images.shape}, '
                    f'labels {labels.shape}; re-prepare it in a fresh --config.data_dir')
  return images, labels


@functools.lru_cache(maxsize=8)
def channel_stats(name: str, data_dir: str = '') -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std (0–255 scale): the paper's constants or computed."""
  s = spec(name)
  if s.mean is not None:
    return np.asarray(s.mean, np.float32), np.asarray(s.std, np.float32)
  return pixel_stats(load_arrays(name, 'train', data_dir)[0])


def pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 NHWC images, in float32.

  From exact integer sums of x and x² (Python integers for the variance's numerator, so
  nothing cancels): numpy's float64 mean and std of every pixel, rounded once to float32,
  in 0.07 s for Fashion-MNIST's 47M pixels, where numpy's takes seconds at every start."""
  x = images.reshape(-1, images.shape[-1])
  n = x.shape[0]
  sums, squares = np.zeros((2, x.shape[1]), np.uint64)
  for i in range(0, n, 1 << 22):  # 4M pixels at a time: 16 MB a channel as uint32
    chunk = x[i:i + (1 << 22)].astype(np.uint32)
    sums += chunk.sum(0, dtype=np.uint64)
    squares += (chunk * chunk).sum(0, dtype=np.uint64)
  mean = [int(s) / n for s in sums]
  var = [(n * int(q) - int(s) ** 2) / (n * n) for s, q in zip(sums, squares)]
  return np.asarray(mean, np.float32), np.sqrt(np.asarray(var, np.float64)).astype(np.float32)


def normalize(images, mean, std, dtype):
  """uint8 NHWC → (x − mean) / std in the computation dtype; runs on the device."""
  return ((images.astype(np.float32) - mean) / std).astype(dtype)


# --------------------------------------------------------------------------------------
# Deterministic order and augmentation for in-memory datasets.


def example_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Indices of the global batch at ``step``: a slice of the endless stream made of
  per-epoch permutations, each drawn from (seed, epoch)."""
  parts, start, need = [], step * batch_size, batch_size
  while need:
    epoch, offset = divmod(start, num_examples)
    part = _permutation(seed, epoch, num_examples)[offset:offset + need]
    parts.append(part)
    start, need = start + len(part), need - len(part)
  return np.concatenate(parts)


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 0]).permutation(n)


def draw_crop_flip(seed: int, step: int, batch_size: int, padding: int):
  """Crop offsets and flip decisions for the whole global batch at ``step``, so that
  they do not depend on how the batch is split across processes."""
  rng = np.random.default_rng([seed, step, 1])
  return rng.integers(0, 2 * padding + 1, size=(batch_size, 2)), rng.random(batch_size) < 0.5


def crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  padding: int, flip: bool) -> np.ndarray:
  """The paper's CIFAR augmentation: zero-pad, crop the original size at ``offsets``,
  flip horizontally where ``flips`` (drawn with p = 0.5)."""
  n, h, w, _ = images.shape
  if padding:
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, :1] + np.arange(h)
    cols = offsets[:, 1:] + np.arange(w)
    images = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if flip:
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


@dataclasses.dataclass
class InMemory:
  """A small dataset held in host memory; batches are pure functions of (seed, step)."""
  name: str
  batch_size: int          # global
  seed: int
  padding: int = 4
  flip: bool = True
  data_dir: str = ''
  process_index: int = 0
  process_count: int = 1
  # Arrays already in memory (the benchmark's synthetic ones); else the TFDS train split.
  images: np.ndarray | None = dataclasses.field(default=None, repr=False)
  labels: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.images is None:
      self.images, self.labels = load_arrays(self.name, 'train', self.data_dir)
    if self.batch_size % self.process_count:
      raise UserError(f'batch_size {self.batch_size} is not divisible by the '
                      f'{self.process_count} processes')
    self.local = self.batch_size // self.process_count

  @property
  def num_examples(self) -> int:
    return len(self.images)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch at ``step``."""
    lo = self.process_index * self.local
    mine = slice(lo, lo + self.local)
    idx = example_indices(step, self.batch_size, self.num_examples, self.seed)[mine]
    offsets, flips = draw_crop_flip(self.seed, step, self.batch_size, self.padding)
    images = crop_and_flip(self.images[idx], offsets[mine], flips[mine], self.padding,
                           self.flip)
    return {'image': images, 'label': self.labels[idx]}

  def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    return (self.batch(t) for t in itertools.count(start_step))


class Prefetch:
  """Prepares ``count`` batches of ``source`` on a host thread, ``depth`` ahead of the
  device; ``put`` places each one (on the devices)."""

  def __init__(self, source: Iterator, put, count: int, depth: int):
    self._q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()

    def work():
      try:
        for _ in range(count):
          if self._stop.is_set():
            return
          self._q.put(put(next(source)))
      except BaseException as e:  # noqa: BLE001 — re-raised in the consumer
        self._q.put(e)

    self._thread = threading.Thread(target=work, daemon=True)
    self._thread.start()

  def __next__(self):
    item = self._q.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    while not self._q.empty():
      self._q.get_nowait()


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once: global batches in order, the last one zero-padded with
  mask 0; each process takes its slice of every global batch."""
  n = len(images)
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    lo = start + process_index * local
    hi = min(lo + local, n)
    img, lab = images[lo:hi], labels[lo:hi]
    pad = local - len(img)
    yield {'image': np.concatenate([img, np.zeros((pad, *images.shape[1:]), images.dtype)]),
           'label': np.concatenate([lab, np.zeros((pad,), labels.dtype)]),
           'mask': np.concatenate([np.ones(len(img), np.float32), np.zeros(pad, np.float32)])}
