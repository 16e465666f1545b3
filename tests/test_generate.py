"""Few-step generation on a whole tiny SDXL directory (UNet, VAE, text encoders, tokenizers):
the CLI writes PNGs; a LoRA changes the images; the jitted step equals its parts composed."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import sdxl_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

from mcm_jax import generate, mlcm  # pylint: disable=wrong-import-position
from mcm_jax import lora as lora_lib  # pylint: disable=wrong-import-position
from mcm_jax.models import sdxl  # pylint: disable=wrong-import-position

PROMPTS = ["lower newer", "wider lowest", "newer"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
  return sdxl_fixtures.write_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


def test_generation_with_and_without_lora(sdxl_dir, tmp_path):
  pipeline = generate.load_pipeline(sdxl_dir)
  base = generate.generate_images(pipeline, PROMPTS, steps=2, resolution=16, batch_size=2)
  assert base.shape == (3, 16, 16, 3) and np.all(np.abs(base) <= 1)
  again = generate.generate_images(pipeline, PROMPTS, steps=2, resolution=16, batch_size=2)
  np.testing.assert_array_equal(base, again)  # deterministic in the seed

  unet, params = sdxl.load_unet(sdxl_dir)
  lora = lora_lib.init_lora(params, 4, jax.random.PRNGKey(0))
  lora = {k: {"a": v["a"], "b": 0.5 + 0 * v["b"]} for k, v in lora.items()}
  lora_lib.save(str(tmp_path / "lora"), lora)
  adapted = generate.generate_images(generate.load_pipeline(sdxl_dir, str(tmp_path / "lora")),
                                     PROMPTS, steps=2, resolution=16, batch_size=2)
  assert np.abs(adapted - base).mean() > 1e-3

  # The jitted generator == text encoding + K-step MLCM sampling + VAE decoding, done by hand.
  vae, vae_params = sdxl.load_vae(sdxl_dir)
  cond = sdxl.load_text_encoders(sdxl_dir)(PROMPTS[:2])
  cond["time_ids"] = sdxl.time_ids(16, 2)
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), (2, 8, 8, 4))
  eps = sdxl.make_eps_fn(unet)
  z = mlcm.consistency_sample(lambda zz, t: eps(params, zz, t, cond), noise, 2)
  by_hand = np.asarray(sdxl.make_decoder(vae)(vae_params, z))
  np.testing.assert_allclose(base[:2], by_hand, atol=1e-4)


def test_cli_writes_pngs(sdxl_dir, tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  out = tmp_path / "out"
  env = dict(os.environ, XLA_FLAGS="")
  subprocess.run([sys.executable, "-m", "mcm_jax.generate", f"--sdxl={sdxl_dir}",
                  f"--prompts={prompts}", "--steps=1", "--resolution=32", "--batch_size=4",
                  f"--out={out}"], check=True, env=env, capture_output=True)
  names = sorted(os.listdir(out))
  assert names == ["00000_lower_newer.png", "00001_wider_lowest.png", "00002_newer.png",
                   "grid.png"]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(out / names[0]).size == (32, 32)
  bad = subprocess.run([sys.executable, "-m", "mcm_jax.generate", f"--sdxl={sdxl_dir}",
                        "--prompt=x", "--steps=0", f"--out={out}"], env=env,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "--steps=0 is invalid" in bad.stderr


def test_t2i_eval_clip_score_equals_pytorch(sdxl_dir, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=g-import-not-at-top
  from mcm_jax import rewards, t2i_eval  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
  n = len(sdxl_fixtures.VOCAB)
  clip = CLIPModel(CLIPConfig(
      text_config=dict(small, vocab_size=n, max_position_embeddings=77, bos_token_id=n - 2,
                       eos_token_id=n - 1, pad_token_id=n - 1),
      vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)).eval()
  clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
  tok = sdxl_fixtures.write_tokenizer(str(tmp_path / "clip"))
  sdxl_fixtures.tiny_head(tmp_path)
  results = t2i_eval.evaluate(sdxl_dir, PROMPTS, [1, 2], str(tmp_path / "out"),
                              str(tmp_path / "clip"), str(tmp_path / "head.pth"),
                              resolution=32, batch_size=2)
  saved = json.load(open(tmp_path / "out" / "eval.json"))
  assert set(saved["results"]) == {"1", "2"} and saved["results"]["2"] == results["2"]
  # The CLIP score of the 2-step images, recomputed in PyTorch.
  images = generate.generate_images(generate.load_pipeline(sdxl_dir), PROMPTS, 2, 32,
                                    batch_size=2)
  pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(rewards.CLIP_MEAN)) / \
      torch.from_numpy(rewards.CLIP_STD)
  ids = torch.from_numpy(tok(PROMPTS, padding="max_length", max_length=77,
                             return_tensors="np").input_ids)
  with torch.no_grad():
    cos = torch.nn.functional.cosine_similarity(
        clip.get_image_features(pixel_values=pixels.permute(0, 3, 1, 2).float()),
        clip.get_text_features(input_ids=ids))
  want = float((100 * cos.clamp(min=0)).mean())
  np.testing.assert_allclose(results["2"]["clip_score"], want, atol=1e-3)
  assert os.path.isfile(tmp_path / "out" / "grid_1step.png") and "aesthetic" in results["1"]
