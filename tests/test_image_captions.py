"""The image + caption folder source (``data.image_captions``): both layouts (Hugging Face
``imagefolder`` metadata and kohya caption files), decoding to the training resolution, the
deterministic per-step batches, and the errors a user with a wrong folder meets."""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

import helpers
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


@pytest.mark.parametrize("json_captions", [False, True], ids=["txt", "json"])
def test_webdataset_shards_read_what_the_folder_holds(tmp_path, json_captions):
  """Shards of the same images and captions (three .tar files) give the folder's pairs, by
  random access into the shards; ``open_source`` picks the source from what ``dir`` holds."""
  folder = _write(tmp_path / "f", n=5)
  shards = helpers.webdataset_shards(folder, tmp_path / "wds", json_captions=json_captions)
  config = {"dir": str(shards), "tfds": ""}
  source = image_captions.open_source(_Config(config), 8)
  assert isinstance(source, image_captions.WebDatasetShards) and len(source) == 5
  reference = image_captions.ImageCaptionFolder(str(folder), 8)
  assert source.captions == reference.captions
  assert [name for name, _ in source.pairs][:3] == [
      "00000.tar/000000000", "00000.tar/000000001", "00001.tar/000010002"]
  order = [4, 0, 3, 1]
  got, want = loader.read(source, order), loader.read(reference, order)
  np.testing.assert_array_equal(got["x"], want["x"])
  assert list(got["label"]) == list(want["label"])
  assert isinstance(image_captions.open_source(_Config(dict(config, dir=str(folder))), 8),
                    image_captions.ImageCaptionFolder)
  copy = pickle.loads(pickle.dumps(source))  # what grain's worker processes receive
  np.testing.assert_array_equal(copy[2]["x"], source[2]["x"])


def test_webdataset_errors_name_the_shard_and_the_sample(tmp_path):
  import tarfile  # pylint: disable=g-import-not-at-top
  folder = _write(tmp_path / "f", n=2)
  shards = tmp_path / "wds"
  shards.mkdir()
  with tarfile.open(shards / "00000.tar", "w") as tar:
    tar.add(folder / "img0.png", arcname="a.png")  # no caption
  with pytest.raises(UserError, match=r"00000.tar: sample 'a' has no caption"):
    image_captions.WebDatasetShards(str(shards), 8)
  with tarfile.open(shards / "00000.tar", "w:gz") as tar:
    tar.add(folder / "img0.png", arcname="a.png")
  with pytest.raises(UserError, match=r"00000.tar is not an uncompressed tar.*random access"):
    image_captions.WebDatasetShards(str(shards), 8)
  with tarfile.open(shards / "00000.tar", "w") as tar:
    tar.add(folder / "img0.txt", arcname="a.txt")
    tar.add(folder / "img0.txt", arcname="a.jpg")  # a caption where the image should be
  with pytest.raises(UserError, match=r"a \(bytes \d+\+\d+ of .*00000.tar\) is not a readable"):
    loader.read(image_captions.WebDatasetShards(str(shards), 8), [0])


class _Config(dict):
  """A dict read as a config section (``section.field`` and ``.get``)."""
  __getattr__ = dict.__getitem__
