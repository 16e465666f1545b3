"""Few-step generation on a whole tiny SDXL directory (UNet, VAE, text encoders, tokenizers):
the CLI writes PNGs; a LoRA changes the images; the jitted step equals its parts composed."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mcm_jax import generate, mlcm
from mcm_jax import lora as lora_lib
from mcm_jax.models import sdxl

PROMPTS = ["lower newer", "wider lowest", "newer"]
# Every test here runs the whole tiny SDXL pipeline (seconds to tens of seconds each).
pytestmark = pytest.mark.slow


@pytest.fixture(name="sdxl_dir")
def _sdxl_dir(tiny_sdxl_dir):
  return tiny_sdxl_dir  # conftest's session-wide directory, read-only here


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
  denoise = sdxl.make_denoiser(unet)
  z = mlcm.sample(lambda zz, t: denoise(params, zz, t, cond), noise, 2)
  by_hand = np.asarray(sdxl.make_decoder(vae)(vae_params, z))
  np.testing.assert_allclose(base[:2], by_hand, atol=1e-4)
  # LCM's sampler on LCMScheduler's grid: the same composition with its fresh noise (seed + 1).
  lcm = generate.generate_images(pipeline, PROMPTS, steps=2, resolution=16, batch_size=2,
                                 timesteps="lcm", sampler="lcm")
  z = mlcm.sample(lambda zz, t: denoise(params, zz, t, cond), noise, mlcm.timestep_grid(2, "lcm"),
                  "lcm", jax.random.fold_in(jax.random.PRNGKey(1), 0))
  np.testing.assert_allclose(lcm[:2], np.asarray(sdxl.make_decoder(vae)(vae_params, z)),
                             atol=1e-4)
  assert np.abs(lcm - base).mean() > 1e-3
  # The kohya export (float16) gives the PEFT export's images.
  kohya = generate.generate_images(
      generate.load_pipeline(sdxl_dir, str(tmp_path / "lora" / "lora_kohya.safetensors")),
      PROMPTS, steps=2, resolution=16, batch_size=2)
  np.testing.assert_allclose(kohya, adapted, atol=5e-3)


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


def test_t2i_eval_clip_score_equals_pytorch(sdxl_dir, tiny_clip_model, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  torch = pytest.importorskip("torch")
  from mcm_jax import rewards, t2i_eval  # pylint: disable=g-import-not-at-top
  clip, tok = tiny_clip_model.clip, tiny_clip_model.tokenizer
  results = t2i_eval.evaluate(sdxl_dir, PROMPTS, [1, 2], str(tmp_path / "out"),
                              str(tiny_clip_model.dir / "clip"),
                              str(tiny_clip_model.dir / "head.pth"), resolution=32, batch_size=2)
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
