"""The image + caption folder source (``data.image_captions``): both layouts (Hugging Face
``imagefolder`` metadata and kohya caption files), decoding to the training resolution, the
deterministic per-step batches, and the errors a user with a wrong folder meets."""
import json

import numpy as np
import pytest
from PIL import Image

from mcm_jax.data import image_captions, loader
from mcm_jax.errors import UserError


def _write(directory, n=5, layout="sidecar"):
  """n images whose solid colour encodes their number (red = 40 i), captions 'thing <i>'."""
  directory.mkdir(exist_ok=True)
  rows = []
  for i in range(n):
    pixels = np.zeros((12 + 2 * i, 10, 3), np.uint8)  # not square: the centre crop matters
    pixels[..., 0] = 40 * i
    Image.fromarray(pixels).save(directory / f"img{i}.png")
    if layout == "sidecar":
      (directory / f"img{i}.txt").write_text(f"  thing {i}\n")
    rows.append(json.dumps({"file_name": f"img{i}.png", "text": f"thing {i}"}))
  if layout == "metadata":
    (directory / "metadata.jsonl").write_text("\n".join(rows) + "\n")
  return directory


@pytest.mark.parametrize("layout", ["sidecar", "metadata"])
def test_both_layouts_read_the_same_pairs(tmp_path, layout):
  source = image_captions.ImageCaptionFolder(str(_write(tmp_path / "f", layout=layout)), 8)
  assert len(source) == 5 and source.captions == [f"thing {i}" for i in range(5)]
  pairs = loader.read(source, [3, 0])
  images, captions = pairs["x"], list(pairs["label"])
  assert images.shape == (2, 8, 8, 3) and captions == ["thing 3", "thing 0"]
  # solid colours survive crop and resize exactly: red 120 -> 120 / 127.5 - 1
  np.testing.assert_allclose(images[0, ..., 0], 120 / 127.5 - 1, atol=1e-6)
  np.testing.assert_allclose(images[..., 1:], -1.0)


def test_batches_are_a_function_of_the_step_and_keep_captions_with_their_images(tmp_path):
  source = image_captions.ImageCaptionFolder(str(_write(tmp_path / "f", n=6)), 8)
  encode = lambda texts: {"context": np.array([[float(t.split()[1])] for t in texts])}
  batch = image_captions.host_batch_fn(source, encode, 4, seed=1)
  again = image_captions.host_batch_fn(source, encode, 4, seed=1)
  for step in (0, 1, 5, 2):
    b = batch(step)
    np.testing.assert_array_equal(b["image"], again(step)["image"])
    index = b["context"][:, 0]  # the caption's number is the image's colour
    np.testing.assert_allclose(b["image"][:, 0, 0, 0], 40 * index / 127.5 - 1, atol=1e-6)
  seen = np.concatenate([batch(s)["context"][:, 0] for s in (0, 1, 2)])[:6]
  assert sorted(seen) == list(range(6))  # one epoch: each image once


def test_folder_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    image_captions.ImageCaptionFolder(str(tmp_path / "nowhere"), 8)
  folder = _write(tmp_path / "a", n=2)
  (folder / "img1.txt").unlink()
  with pytest.raises(UserError, match=r"img1.png has no caption: add img1.txt"):
    image_captions.ImageCaptionFolder(str(folder), 8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="holds no images"):
    image_captions.ImageCaptionFolder(str(tmp_path / "empty"), 8)
  folder = _write(tmp_path / "b", n=2, layout="metadata")
  (folder / "metadata.jsonl").write_text('{"file_name": "img0.png"}\n')
  with pytest.raises(UserError, match=r"metadata.jsonl:1: needs 'file_name' and one of"):
    image_captions.ImageCaptionFolder(str(folder), 8)
  (folder / "metadata.jsonl").write_text('{"file_name": "gone.png", "caption": "x"}\n')
  with pytest.raises(FileNotFoundError, match="gone.png named in metadata.jsonl"):
    loader.read(image_captions.ImageCaptionFolder(str(folder), 8), [0])
  (folder / "bad.png").write_bytes(b"not a png")
  (folder / "metadata.jsonl").write_text('{"file_name": "bad.png", "caption": "x"}\n')
  with pytest.raises(UserError, match="bad.png is not a readable image"):
    loader.read(image_captions.ImageCaptionFolder(str(folder), 8), [0])
  (folder / "metadata.jsonl").write_text('{"file_name": "img0.png", "caption": " "}\n')
  with pytest.raises(UserError, match="img0.png has an empty caption"):
    image_captions.ImageCaptionFolder(str(folder), 8)
