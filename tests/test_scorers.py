"""The evaluation scorers against PyTorch references on tiny random weights of the same
architecture: ImageReward (BLIP ViT + BERT with cross-attention + MLP head) read from its
checkpoint layout, against transformers' PyTorch BLIP vision and text models
(``sdxl_fixtures.write_tiny_imagereward``)."""
import json

import numpy as np
import pytest

from mcm_jax import scorers

pytestmark = pytest.mark.slow  # builds and compiles tiny models (seconds)

PROMPTS = ["a red fox in the snow", "a photo of a cat", "snow"]


def test_imagereward_equals_pytorch(tiny_imagereward):
  import jax  # pylint: disable=g-import-not-at-top
  path, torch_score = tiny_imagereward.dir, tiny_imagereward.score
  model = scorers.load_imagereward(str(path))
  images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  prompts = PROMPTS
  got = np.asarray(jax.jit(model.score)(model.params, images, model.tokenize(prompts)))
  want = torch_score(images, prompts)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.ptp(want) > 1e-2  # the scores differ between (image, prompt) pairs
  swapped = np.asarray(model.score(model.params, images, model.tokenize(prompts[::-1])))
  assert np.abs(swapped - got).max() > 1e-3  # the prompt matters


def test_imagereward_bad_directories(tiny_imagereward, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  path = tiny_imagereward.dir
  with pytest.raises(FileNotFoundError, match="has no ImageReward.pt"):
    scorers.load_imagereward(str(tmp_path))
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  (broken / "ImageReward.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
    scorers.load_imagereward(str(broken))
  other = tmp_path / "other"
  shutil.copytree(path, other)
  med = json.loads((path / "med_config.json").read_text())
  (other / "med_config.json").write_text(json.dumps(dict(med, hidden_size=32)))
  with pytest.raises(ValueError, match="do not fit the architecture"):
    scorers.load_imagereward(str(other))


def test_t2i_eval_reports_imagereward(tiny_imagereward, tiny_sdxl_dir, tiny_clip_model,
                                      tmp_path):
  """``t2i_eval`` with ``imagereward_dir``: the column equals the PyTorch scores of the images
  ``generate_images`` gives for the same settings."""
  from mcm_jax import pipeline, t2i_eval  # pylint: disable=g-import-not-at-top
  path, torch_score, prompts = tiny_imagereward.dir, tiny_imagereward.score, PROMPTS
  results = t2i_eval.evaluate(tiny_sdxl_dir, prompts, [2], str(tmp_path / "out"),
                              str(tiny_clip_model.dir / "clip"), resolution=32, batch_size=2,
                              imagereward_dir=str(path))
  images = pipeline.generate_images(pipeline.load_pipeline(tiny_sdxl_dir), prompts, 2, 32,
                                    batch_size=2)
  np.testing.assert_allclose(results["2"]["imagereward"],
                             float(np.mean(torch_score(images, prompts))), rtol=1e-4, atol=1e-4)
