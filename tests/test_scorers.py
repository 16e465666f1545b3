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


def test_open_clip_checkpoint_converts_to_an_equal_clip(tmp_path):
  """An open_clip CLIP (HPSv2's architecture family: exact GELU, fused in_proj, argmax pooling)
  written as HPSv2 ships it ({'state_dict': ...}) and converted: ``scorers.load_clip``'s
  cosine (HPSv2's score) equals open_clip's normalised ``encode_image . encode_text`` with
  open_clip's own tokenizer."""
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  import jax  # pylint: disable=g-import-not-at-top
  from mcm_jax import convert_open_clip  # pylint: disable=g-import-not-at-top
  from mcm_jax import rewards  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = open_clip.model.CLIP(
      embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(
          layers=2, width=64, head_width=32, patch_size=8, image_size=32),
      text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32,
                                           heads=2, layers=2)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.05 * torch.randn_like(p) * (1.0 if p.ndim < 2 else p[0].numel() ** -0.5 * 20))
  torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
             tmp_path / "hps.pt")
  out = convert_open_clip.convert(str(tmp_path / "hps.pt"), str(tmp_path / "hf"), heads=(2, 2))
  clip = scorers.load_clip(out)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  prompts = ["a red fox in the snow", "a photo of a cat"]
  got = np.asarray(jax.jit(scorers.hps_score(clip))(clip.params, images, clip.tokenize(prompts)))
  pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(rewards.CLIP_MEAN)) / \
      torch.from_numpy(rewards.CLIP_STD)
  with torch.no_grad():
    img = model.encode_image(pixels.permute(0, 3, 1, 2).float(), normalize=True)
    txt = model.encode_text(open_clip.tokenize(prompts), normalize=True)
  want = (img * txt).sum(-1).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.ptp(want) > 1e-3
  with pytest.raises(ValueError, match="not an open_clip CLIP checkpoint"):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    convert_open_clip.convert(str(tmp_path / "other.pt"), str(tmp_path / "x"), "ViT-H-14")
  with pytest.raises(ValueError, match="model='ViT-Q' is not known"):
    convert_open_clip.convert(str(tmp_path / "hps.pt"), str(tmp_path / "x"), "ViT-Q")
