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
  base = generate.generate_images(sdxl_dir, PROMPTS, steps=2, resolution=16, batch_size=2)
  assert base.shape == (3, 16, 16, 3) and np.all(np.abs(base) <= 1)
  again = generate.generate_images(sdxl_dir, PROMPTS, steps=2, resolution=16, batch_size=2)
  np.testing.assert_array_equal(base, again)  # deterministic in the seed

  unet, params = sdxl.load_unet(sdxl_dir)
  lora = lora_lib.init_lora(params, 4, jax.random.PRNGKey(0))
  lora = {k: {"a": v["a"], "b": 0.5 + 0 * v["b"]} for k, v in lora.items()}
  lora_lib.save(str(tmp_path / "lora"), lora)
  adapted = generate.generate_images(sdxl_dir, PROMPTS, steps=2, resolution=16, batch_size=2,
                                     lora_path=str(tmp_path / "lora"))
  assert np.abs(adapted - base).mean() > 1e-3

  # The jitted generator == text encoding + K-step MLCM sampling + VAE decoding, done by hand.
  vae, vae_params = sdxl.load_vae(sdxl_dir)
  cond = sdxl.load_text_encoders(sdxl_dir)(PROMPTS[:2])
  cond["time_ids"] = generate.time_ids(16, 2)
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
  assert bad.returncode != 0 and "steps=0 is invalid" in bad.stderr
