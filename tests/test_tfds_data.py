"""The tfds path (what ImageNet uses) on a small dataset the test prepares itself: array_record
files in a local data_dir, JPEGs of odd sizes, random access without TensorFlow."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from configs import imagenet64_base
from mcm_jax.experiments import pixel
from mcm_jax.data import images as image_data
from mcm_jax.data import loader

NUM_TRAIN = 24


def _image(i):
  """A JPEG whose central square is a flat colour given by i (the border is black)."""
  h, w = 40 + 2 * (i % 3), 56
  img = np.zeros((h, w, 3), np.uint8)
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img[top:top + s, left:left + s] = (10 * i, 255 - 10 * i, 128)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  buf.seek(0)
  return buf


def tiny_imagenet_like_builder():
  """The builder class, defined once tensorflow_datasets is imported (inside the fixture)."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyImagenetLike(tfds.core.GeneratorBasedBuilder):
    """ImageNet's tfds features (JPEG image, integer label), 24 + 6 examples."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=4)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(NUM_TRAIN),
              "validation": self._generate_examples(6)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": _image(i), "label": i % 4}

  return TinyImagenetLike


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  tiny_imagenet_like_builder()(data_dir=path, file_format="array_record").download_and_prepare()
  return path


def test_tfds_source_decodes_crops_and_resizes(data_dir):
  source = image_data.load("tiny_imagenet_like", 16, data_dir)
  assert len(source) == NUM_TRAIN
  read = loader.read(source, range(NUM_TRAIN))
  x, labels = read["x"], read["label"]
  assert x.shape == (NUM_TRAIN, 16, 16, 3) and x.dtype == np.float32
  # The central square is flat: the crop dropped the black border, the colour is exact up to
  # JPEG error; the label says which example it was (colour 10 i <-> label i mod 4).
  np.testing.assert_allclose(x[..., 2], 128 / 127.5 - 1, atol=0.1)  # no black border left
  green = np.round((x[:, 8, 8, 1] + 1) * 127.5)
  i_from_colour = np.round((255 - green) / 10).astype(int)
  np.testing.assert_array_equal(i_from_colour % 4, labels)
  assert sorted(i_from_colour) == list(range(NUM_TRAIN))
  assert len(image_data.load("tiny_imagenet_like", 16, data_dir, "validation")) == 6


def test_tfds_batches_are_deterministic_epochs(data_dir):
  source = image_data.load("tiny_imagenet_like", 8, data_dir)
  batch = loader.host_batch_fn(source, 8, seed=0)  # 3 steps per epoch, read ahead in threads
  seen = []
  for step in (0, 1, 2, 5, 4, 3):  # out of order, as after a resume
    b = batch(step)
    want = loader.read(source, loader.epoch_indices(step, 8, NUM_TRAIN, 0), threads=0)
    np.testing.assert_array_equal(b["x"], want["x"])
    np.testing.assert_array_equal(b["label"], want["label"])
    seen.append((step, tuple(np.round(b["x"][:, 4, 4, 0], 3))))
  first_epoch = sorted(sum((list(v) for s, v in seen if s < 3), []))
  assert len(set(first_epoch)) == NUM_TRAIN  # each example once per epoch


@pytest.mark.slow  # starts two worker processes (each imports tensorflow-datasets)
def test_worker_processes_read_the_same_batches(data_dir):
  """grain's worker processes (``data.reading.workers``) each build whole batches: the batches
  are those of the training process's own threads, from any starting step."""
  source = image_data.load("tiny_imagenet_like", 8, data_dir)
  threads = loader.host_batch_fn(source, 8, seed=5)
  workers = loader.host_batch_fn(source, 8, seed=5, workers=2, threads=1)
  try:
    for step in (0, 1, 2, 3, 7, 8):
      np.testing.assert_array_equal(workers(step)["x"], threads(step)["x"])
  finally:
    workers.close()


def test_tfds_errors_name_the_dataset_and_dir(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="'no_such_set'.*data_dir="):
    image_data.load("no_such_set", 16, data_dir)
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    image_data.load("tiny_imagenet_like", 16, str(tmp_path / "missing"))


@pytest.mark.slow  # a pixel run end to end (the data preparation itself takes < 1 s)
def test_pixel_base_training_reads_tfds(data_dir, tmp_path):
  config = imagenet64_base.get_config("tiny")
  config.data.update(name="tiny_imagenet_like", data_dir=data_dir, channels=3, num_classes=4)
  config.train.update(steps=2, log_every=1, checkpoint_every=2, batch_size=8)
  config.sample.update(num=8, x_var_data=16, x_var_points=4)
  result = pixel.run(config, str(tmp_path))
  assert os.path.getsize(result["samples"][0]) > 100
  assert "base/loss" in open(tmp_path / "metrics.jsonl").read()


def test_tfds_image_caption_source(tmp_path):
  """A prepared tfds dataset with images and COCO-style nested captions (a sequence of
  ``{'text'}`` per image) as an image + caption source (``images.tfds``, caption_key
  'captions/text': the first caption of each image)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from mcm_jax.data import image_captions  # pylint: disable=g-import-not-at-top
  from mcm_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  class TinyCaptioned(tfds.core.GeneratorBasedBuilder):
    """Four JPEGs, each with two captions."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": _image(i), "captions": {"text": [f"colour {i}", f"other {i}"]}}

  TinyCaptioned(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = dict(dir=str(tmp_path), tfds="tiny_captioned", split="train",
                caption_key="captions/text")
  section = type("Section", (dict,), {"__getattr__": dict.__getitem__})
  source = image_captions.open_source(section(config), 16)
  assert len(source) == 4 and sorted(source.captions) == [f"colour {i}" for i in range(4)]
  read = loader.read(source, range(4))
  green = np.round((read["x"][:, 8, 8, 1] + 1) * 127.5)  # the colour says which image it is
  i_from_colour = np.round((255 - green) / 10).astype(int)
  assert [f"colour {i}" for i in i_from_colour] == list(read["label"])
  with pytest.raises(UserError, match=r"no caption feature 'caption'; its features: "
                     r"\['captions', 'image'\]"):
    image_captions.open_source(section(config, caption_key="caption"), 16)
