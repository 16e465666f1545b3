"""Image datasets, read in batches by ``mcm_jax.data.loader``.

Image sources for the loader (grain's random-access protocol): ``len(source)`` and
``source[i] -> {'x': float32 [r, r, C] in [-1, 1], 'label': int32}``; ``load(name, ...)``:
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (shipped inside the scikit-learn wheel,
  no download; scikit-learn is BSD-3, the data is the UCI "Optical Recognition of Handwritten
  Digits" set, CC BY 4.0), upsampled (nearest) to the requested resolution, 1 channel.
- any other name: a tensorflow-datasets dataset read by random access (``tfds.data_source``,
  array_record files; no TensorFlow needed) from a local ``data_dir`` -- nothing downloads.
  E.g. ``imagenet2012`` (prepare once with ``tfds build imagenet2012 --manual_dir=...
  --file_format=array_record``) or ``imagenet_resized/64x64``. Images are decoded with PIL,
  centre-cropped to a square and resized (PIL bicubic, antialiased) to the resolution. With
  ``jpeg_draft`` a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose short side
  is still >= the resolution (PIL ``draft``: the decoder's DCT scaling), then cropped and
  resized the same way: several times less decoding for 64 / 128 px, slightly other pixels.
"""
import io

import numpy as np

from mcm_jax import storage
from mcm_jax.errors import MissingExtraError, UserError

DIGITS = "digits"


def load_digits(resolution=16):
  """(images [1797, r, r, 1] float32 in [-1, 1], labels [1797] int32); r a multiple of 8."""
  if resolution % 8:
    raise UserError(f"data.resolution={resolution} is invalid for digits; allowed: multiples "
                    "of 8")
  try:
    from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingExtraError(
        "the digits dataset needs scikit-learn: pip install -e '.[demo]'") from e
  data = sk_digits()
  images = data.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values 0..16
  k = resolution // 8
  images = np.repeat(np.repeat(images, k, axis=1), k, axis=2)[..., None]
  return images, data.target.astype(np.int32)


class ArraySource:
  """In-memory images [N, H, W, C] in [-1, 1] and labels [N]."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"x": self.images[i], "label": self.labels[i]}


def center_crop_resize(image, resolution):
  """uint8 [H, W, C] -> float32 [r, r, C] in [-1, 1]: central square crop, bicubic resize."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  square = image[top:top + s, left:left + s]
  if s != resolution:
    pil = Image.fromarray(square.squeeze(-1) if square.shape[-1] == 1 else square)
    square = np.asarray(pil.resize((resolution, resolution), Image.BICUBIC))
    square = square.reshape(resolution, resolution, -1)
  return square.astype(np.float32) / 127.5 - 1.0


class TfdsSource:
  """A tfds dataset split by random access; ``source[i]`` decodes, crops and resizes."""

  def __init__(self, name, data_dir, split, resolution, image_key="image", label_key="label",
               jpeg_draft=False):
    if not data_dir or not storage.isdir(data_dir):
      raise FileNotFoundError(f"config.data.data_dir={data_dir!r} is not a directory; "
                              f"data.name={name!r} reads a prepared tfds dataset from a "
                              "directory, local or gs:// (nothing is downloaded)")
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise MissingExtraError(f"data.name={name!r} needs tensorflow-datasets: "
                              "pip install -e '.[imagenet]'") from e
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(f"tfds dataset {name!r} is not known to tfds and not prepared in "
                              f"data_dir={data_dir!r}") from e
    except (FileNotFoundError, AssertionError) as e:
      raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in data_dir={data_dir!r}: "
                              f"{e}") from e
    except NotImplementedError as e:
      raise UserError(f"tfds dataset {name!r} in {data_dir!r} is not in a random-access "
                      "format; prepare it with --file_format=array_record (or convert: "
                      f"`tfds convert_format`): {e}") from e
    self.name, self.resolution = name, resolution
    self.image_key, self.label_key, self.jpeg_draft = image_key, label_key, jpeg_draft

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    record = self.source[int(i)]
    image = Image.open(io.BytesIO(record[self.image_key]))
    if self.jpeg_draft:  # decode a JPEG at 1/2, 1/4 or 1/8 scale, its short side >= resolution
      image.draft("RGB", (self.resolution, self.resolution))
    image = np.asarray(image.convert("RGB"))
    return {"x": center_crop_resize(image, self.resolution), "label": self.label(record)}

  def label(self, record):
    """A record's label: the integer class."""
    return np.int32(record[self.label_key])


def load(name, resolution, data_dir="", split="train", jpeg_draft=False):
  """The source for ``config.data``: digits, or a tfds dataset from a local directory
  (``jpeg_draft``: JPEGs decoded by PIL's draft mode, see ``TfdsSource``)."""
  if name == DIGITS:
    return ArraySource(*load_digits(resolution))
  return TfdsSource(name, data_dir, split, resolution, jpeg_draft=jpeg_draft)
