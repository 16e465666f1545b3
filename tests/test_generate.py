"""Generation on a whole tiny SDXL directory (UNet, VAE, text encoders, tokenizers): the CLI
writes PNGs; a LoRA changes the images; the jitted step equals its parts composed; the guided
teacher equals diffusers' PyTorch SDXL pipeline."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers  # tests/
import sdxl_fixtures  # tests/: torch is imported inside its functions
from mcm_jax import errors, pipeline, seeds
from mcm_jax import lora as lora_lib
from mcm_jax.models import sdxl, sdxl_text
from mcm_jax.samplers import discrete

PROMPTS = ["lower newer", "wider lowest", "newer"]
# Every test here runs the whole tiny SDXL pipeline (seconds to tens of seconds each).
pytestmark = pytest.mark.slow


@pytest.fixture(name="sdxl_dir")
def _sdxl_dir(tiny_sdxl_dir):
  return tiny_sdxl_dir  # conftest's session-wide directory, read-only here


@pytest.fixture(name="base_models", scope="module")
def _base_models(tiny_sdxl_dir):
  """The tiny directory's pipeline without a LoRA, loaded once for the module (its compiled
  generators are kept in it and reused across tests)."""
  return pipeline.load_pipeline(tiny_sdxl_dir)


def test_generation_with_and_without_lora(sdxl_dir, base_models, tmp_path):
  models = base_models
  base = pipeline.generate_images(models, PROMPTS, steps=2, resolution=16, batch_size=2)
  assert base.shape == (3, 16, 16, 3) and np.all(np.abs(base) <= 1)
  again = pipeline.generate_images(models, PROMPTS, steps=2, resolution=16, batch_size=2)
  np.testing.assert_array_equal(base, again)  # deterministic in the seed

  unet, params = sdxl.load_unet(sdxl_dir)
  lora = lora_lib.init_lora(params, 4, jax.random.PRNGKey(0))
  lora = {k: {"a": v["a"], "b": 0.5 + 0 * v["b"]} for k, v in lora.items()}
  lora_lib.save(str(tmp_path / "lora"), lora)
  adapted = pipeline.generate_images(pipeline.load_pipeline(sdxl_dir, str(tmp_path / "lora")),
                                     PROMPTS, steps=2, resolution=16, batch_size=2)
  assert np.abs(adapted - base).mean() > 1e-3

  # The jitted generator == text encoding + K-step MLCM sampling + VAE decoding, done by hand.
  vae, vae_params = sdxl.load_vae(sdxl_dir)
  cond = sdxl_text.load_text_encoders(sdxl_dir)(PROMPTS[:2])
  cond["time_ids"] = sdxl.time_ids(16, 2)
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), (2, 8, 8, 4))
  denoise = sdxl.make_denoiser(unet)
  z = discrete.sample(lambda zz, t: denoise(params, zz, t, cond), noise, 2)
  by_hand = np.asarray(sdxl.make_decoder(vae)(vae_params, z))
  np.testing.assert_allclose(base[:2], by_hand, atol=1e-4)
  # LCM's sampler on LCMScheduler's grid: the same composition with its fresh noise.
  lcm = pipeline.generate_images(models, PROMPTS, steps=2, resolution=16, batch_size=2,
                                 timesteps="lcm", sampler="lcm")
  z = discrete.sample(lambda zz, t: denoise(params, zz, t, cond), noise, discrete.timestep_grid(2, "lcm"),
                  "lcm", jax.random.fold_in(seeds.key(0, "sampler_noise"), 0))
  np.testing.assert_allclose(lcm[:2], np.asarray(sdxl.make_decoder(vae)(vae_params, z)),
                             atol=1e-4)
  assert np.abs(lcm - base).mean() > 1e-3
  # TCD's sampler (gamma 0.5): the same composition with its own fresh-noise stream.
  tcd = pipeline.generate_images(models, PROMPTS, steps=2, resolution=16, batch_size=2,
                                 timesteps="lcm", sampler="tcd", gamma=0.5)
  fresh = jax.random.normal(jax.random.fold_in(seeds.key(0, "sampler_noise"), 0), (1, 2, 8, 8, 4))
  z = discrete.tcd_sample_on_grid(lambda zz, t: denoise(params, zz, t, cond), noise,
                              discrete.timestep_grid(2, "lcm"), 0.5, fresh)
  np.testing.assert_allclose(tcd[:2], np.asarray(sdxl.make_decoder(vae)(vae_params, z)),
                             atol=1e-4)
  # The kohya export (float16) gives the PEFT export's images.
  kohya = pipeline.generate_images(
      pipeline.load_pipeline(sdxl_dir, str(tmp_path / "lora" / "lora_kohya.safetensors")),
      PROMPTS, steps=2, resolution=16, batch_size=2)
  np.testing.assert_allclose(kohya, adapted, atol=5e-3)


def test_guided_teacher_equals_diffusers_sdxl_pipeline(sdxl_dir, base_models):
  """CFG with and without a negative prompt, 6 Euler steps on the 'leading' grid: the images of
  ``pipeline.generate_images`` are those of diffusers' StableDiffusionXLPipeline from the same
  initial noise."""
  torch = pytest.importorskip("torch")
  reference = sdxl_fixtures.diffusers_sdxl_pipeline(sdxl_dir)
  models = base_models
  noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0),
                                       (2, 16, 16, 4)))
  images = {}
  for negative in (None, "wider lowest"):
    ours = pipeline.generate_images(models, PROMPTS[:2], 6, resolution=32, batch_size=2,
                                    timesteps="leading", guidance_scale=5.0,
                                    negative_prompt=negative)
    with torch.no_grad():
      theirs = reference(prompt=PROMPTS[:2], negative_prompt=negative and [negative] * 2,
                         num_inference_steps=6, guidance_scale=5.0, height=32, width=32,
                         latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                         output_type="np").images
    np.testing.assert_allclose((np.clip(ours, -1, 1) + 1) / 2, theirs, atol=1e-4)
    images[negative] = ours
  unguided = pipeline.generate_images(models, PROMPTS[:2], 6, resolution=32, batch_size=2,
                                      timesteps="leading")
  assert np.abs(images[None] - images["wider lowest"]).mean() > 1e-3  # the negative prompt acts
  assert np.abs(images[None] - unguided).mean() > 1e-3  # and so does the guidance


@pytest.mark.slow  # a PyTorch pipeline and a JAX one, a few UNet calls each
def test_guidance_conditioned_student_equals_diffusers_sdxl_pipeline(sdxl_dir, tmp_path):
  """A UNet with ``time_cond_proj_dim`` (LCM's guidance-conditioned student) samples with
  ``guidance_scale=w`` as diffusers' SDXL pipeline does: w - 1 through its guidance embedding, one
  unguided call per step; the images equal the PyTorch pipeline's from the same noise."""
  torch = pytest.importorskip("torch")
  import diffusers  # pylint: disable=g-import-not-at-top
  student_dir = tmp_path / "student"
  shutil.copytree(sdxl_dir, student_dir, ignore=shutil.ignore_patterns("unet"))
  torch.manual_seed(4)
  unet = diffusers.UNet2DConditionModel(**sdxl.TINY_UNET_CONFIG, time_cond_proj_dim=16).eval()
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.02 * torch.randn_like(p))
  unet.save_pretrained(str(student_dir / "unet"))
  models = pipeline.load_pipeline(str(student_dir))
  reference = sdxl_fixtures.diffusers_sdxl_pipeline(str(student_dir))
  noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0),
                                       (2, 16, 16, 4)))
  images = {}
  for w in (2.0, 6.0):
    images[w] = pipeline.generate_images(models, PROMPTS[:2], 3, resolution=32, batch_size=2,
                                         timesteps="leading", guidance_scale=w)
    with torch.no_grad():
      theirs = reference(prompt=PROMPTS[:2], num_inference_steps=3, guidance_scale=w, height=32,
                         width=32, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                         output_type="np").images
    np.testing.assert_allclose((np.clip(images[w], -1, 1) + 1) / 2, theirs, atol=1e-4)
  assert np.abs(images[2.0] - images[6.0]).mean() > 1e-3  # w reaches the UNet
  with pytest.raises(errors.UserError, match="negative_prompt is invalid for a guidance-cond"):
    pipeline.generate_images(models, PROMPTS[:2], 3, resolution=32, batch_size=2,
                             guidance_scale=2.0, negative_prompt="blurry")


def test_stacked_loras_equal_diffusers_adapters(sdxl_dir, tmp_path):
  """Two LoRAs at scales 0.7 and -0.4 (``lora.combine``): the images equal diffusers' pipeline
  with both files loaded as adapters and ``set_adapters`` at those weights."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  _, params = sdxl.load_unet(sdxl_dir)
  files = []
  for seed, rank in ((0, 4), (1, 2)):
    lora = lora_lib.init_lora(params, rank, jax.random.PRNGKey(seed))
    lora = {k: {"a": v["a"], "b": 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 5),
                                                           v["b"].shape)}
            for k, v in lora.items()}
    files.append(lora_lib.save(str(tmp_path / f"lora{seed}"), lora))
  models = pipeline.load_pipeline(sdxl_dir, files, [0.7, -0.4])
  ours = pipeline.generate_images(models, PROMPTS[:2], 3, resolution=32, batch_size=2,
                                  timesteps="leading")
  reference = sdxl_fixtures.diffusers_sdxl_pipeline(sdxl_dir)
  for name, path in zip(("one", "two"), files):
    reference.load_lora_weights(path, adapter_name=name)
  reference.set_adapters(["one", "two"], adapter_weights=[0.7, -0.4])
  noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0),
                                       (2, 16, 16, 4)))
  with torch.no_grad():
    theirs = reference(prompt=PROMPTS[:2], num_inference_steps=3, guidance_scale=1.0,
                       height=32, width=32, output_type="np",
                       latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
  np.testing.assert_allclose((ours + 1) / 2, theirs, atol=1e-4)
  single = pipeline.generate_images(pipeline.load_pipeline(sdxl_dir, files[0], 0.7), PROMPTS[:2],
                                    3, resolution=32, batch_size=2, timesteps="leading")
  assert np.abs(single - ours).mean() > 1e-3  # the second LoRA acts
  with pytest.raises(ValueError, match="2 LoRA files but 3 scales"):
    pipeline.load_pipeline(sdxl_dir, files, [1.0, 1.0, 1.0])


def test_img2img_equals_diffusers_sdxl_img2img_pipeline(sdxl_dir, base_models, monkeypatch):
  """Image-to-image, guided, strength 0.5 of 6 'leading' Euler steps: ``generate_images`` equals
  diffusers' StableDiffusionXLImg2ImgPipeline given the same VAE-posterior and start noise (the
  two draws diffusers makes with ``randn_tensor`` are replaced by ours)."""
  torch = pytest.importorskip("torch")
  import diffusers  # pylint: disable=g-import-not-at-top
  from diffusers.models.autoencoders import vae as torch_vae  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as i2i  # pylint: disable=g-import-not-at-top
  reference = diffusers.StableDiffusionXLImg2ImgPipeline(
      **sdxl_fixtures.diffusers_sdxl_pipeline(sdxl_dir).components)
  shape = (2, 16, 16, 4)
  draws = [np.asarray(jax.random.normal(jax.random.fold_in(seeds.key(0, "vae_posterior"), 0),
                                        shape)),
           np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), shape))]
  queue = [torch.from_numpy(d.transpose(0, 3, 1, 2).copy()) for d in draws]
  ours_first = lambda shape, **kw: queue.pop(0)
  monkeypatch.setattr(torch_vae, "randn_tensor", ours_first)
  monkeypatch.setattr(i2i, "randn_tensor", ours_first)
  x = np.linspace(-1, 1, 32)
  image = np.stack([np.sin(3 * x)[:, None] * np.cos(2 * x)[None, :]] * 3, -1).astype(np.float32)
  with torch.no_grad():
    pixels = torch.from_numpy((image.transpose(2, 0, 1) + 1) / 2)[None].repeat(2, 1, 1, 1)
    theirs = reference(prompt=PROMPTS[:2], image=pixels, strength=0.5, num_inference_steps=6, guidance_scale=3.0,
                       output_type="np").images
  assert not queue  # both draws were ours
  models = base_models
  ours = pipeline.generate_images(models, PROMPTS[:2], 6, resolution=32, batch_size=2,
                                  timesteps="leading", guidance_scale=3.0, init_images=image,
                                  strength=0.5)
  np.testing.assert_allclose((ours + 1) / 2, theirs, atol=1e-4)
  full = pipeline.generate_images(models, PROMPTS[:2], 6, resolution=32, batch_size=2,
                                  timesteps="leading", guidance_scale=3.0, init_images=image,
                                  strength=1.0)
  assert np.abs(full - ours).mean() > 1e-3  # strength acts
  with pytest.raises(ValueError, match="strength=0.1 is invalid for 6 steps"):
    pipeline.generate_images(models, PROMPTS[:2], 6, resolution=32, init_images=image,
                             strength=0.1)
  small = np.repeat(image[None, ::2, ::2], 2, 0)
  with pytest.raises(ValueError, match=r"init images of shape \(2, 16, 16, 3\)"):
    pipeline.generate_images(models, PROMPTS[:2], 6, resolution=32, init_images=small)


def test_cli_writes_pngs(sdxl_dir, tmp_path):
  """Image-to-image at two step counts from one load: each count's PNGs, grid and schedule in
  OUT/steps_<k>/, and OUT/grid.png with a row per prompt and a column per step count."""
  prompts = tmp_path / "p.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  out = tmp_path / "out"
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags())
  from mcm_jax import plotting  # pylint: disable=g-import-not-at-top
  plotting.save_image(str(tmp_path / "init.png"), np.random.default_rng(0).uniform(
      -1, 1, (40, 40, 3)))  # resized to --resolution
  subprocess.run([sys.executable, "-m", "mcm_jax.generate", f"--sdxl={sdxl_dir}",
                  f"--prompts={prompts}", "--steps=2,4", "--resolution=32", "--batch_size=4",
                  f"--init_image={tmp_path / 'init.png'}", "--strength=0.5", f"--out={out}"],
                 check=True, env=env, capture_output=True)
  assert sorted(os.listdir(out)) == ["grid.png", "steps_2", "steps_4"]
  pngs = ["00000_lower_newer.png", "00001_wider_lowest.png", "00002_newer.png"]
  for k in (2, 4):
    assert sorted(os.listdir(out / f"steps_{k}")) == pngs + ["grid.png", "schedule.txt"]
  # image-to-image: of the 2-step grid (999, 500) strength 0.5 runs the last step
  assert "timesteps (the UNet's t at each step): 500\n" in (
      out / "steps_2" / "schedule.txt").read_text()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = {(i, k): np.asarray(Image.open(out / f"steps_{k}" / name))
            for i, name in enumerate(pngs) for k in (2, 4)}
  assert images[0, 2].shape == (32, 32, 3) and not np.array_equal(images[0, 2], images[0, 4])
  want = np.zeros((3 * 33 + 1, 2 * 33 + 1, 3), np.uint8)  # 1-pixel borders, scaled to ~512
  for (i, k), image in images.items():
    col = (2, 4).index(k)
    want[1 + i * 33:1 + i * 33 + 32, 1 + col * 33:1 + col * 33 + 32] = image
  want = np.repeat(np.repeat(want, 5, 0), 5, 1)
  np.testing.assert_array_equal(np.asarray(Image.open(out / "grid.png")), want)
  bad = subprocess.run([sys.executable, "-m", "mcm_jax.generate", f"--sdxl={sdxl_dir}",
                        "--prompt=x", "--steps=2,0", f"--out={out}"], env=env,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "--steps=2,0: '0' is invalid" in bad.stderr


def test_t2i_eval_clip_score_and_pickscore_equal_pytorch(sdxl_dir, base_models, tiny_clip_model,
                                                         tmp_path):
  """The LoRA rows, a third-party LoRA sampled with LCM's sampler (``--model``) and the guided
  teacher: each row's CLIP score and PickScore are PyTorch's on the images
  ``pipeline.generate_images`` makes with that model and sampler."""
  import json  # pylint: disable=g-import-not-at-top
  torch = pytest.importorskip("torch")
  from mcm_jax import rewards, t2i_eval  # pylint: disable=g-import-not-at-top
  clip, tok = tiny_clip_model.clip, tiny_clip_model.tokenizer
  _, params = sdxl.load_unet(sdxl_dir)
  lora = lora_lib.init_lora(params, 4, jax.random.PRNGKey(1))
  lora_lib.save(str(tmp_path / "lcm_lora"), {k: {"a": v["a"], "b": 0.5 + 0 * v["b"]}
                                              for k, v in lora.items()})
  other = t2i_eval.parse_model(f"lcm lora={tmp_path / 'lcm_lora'} sampler=lcm timesteps=lcm "
                               "lora_scale=0.8", [1, 2])
  assert other == t2i_eval.ModelRun("lcm", (1, 2), (str(tmp_path / "lcm_lora"),), (0.8,),
                                    {"sampler": "lcm", "timesteps": "lcm"})
  results = t2i_eval.evaluate(sdxl_dir, PROMPTS, [1, 2], str(tmp_path / "out"),
                              str(tiny_clip_model.dir / "clip"),
                              str(tiny_clip_model.dir / "head.pth"), resolution=32, batch_size=2,
                              pickscore_dir=str(tiny_clip_model.dir / "clip"),
                              teacher=dict(steps=3, guidance_scale=5.0, negative_prompt="wider"),
                              models=[other])
  saved = json.load(open(tmp_path / "out" / "eval.json"))
  assert set(saved["results"]) == {"1", "2", "lcm_1", "lcm_2", "teacher_3"}
  assert saved["results"]["2"] == results["2"]
  assert saved["models"][0]["options"] == {"sampler": "lcm", "timesteps": "lcm"}
  table = (tmp_path / "out" / "eval.md").read_text().splitlines()
  assert table[0].startswith("| run | clip_score | pickscore | aesthetic | num |")
  assert [line.split(" | ")[0] for line in table[2:]] == ["| 1", "| 2", "| lcm_1", "| lcm_2",
                                                          "| teacher_3"]
  for name in ("metrics.png", "grid.png", "grid_teacher_3.png", "grid_lcm_2.png"):
    assert os.path.getsize(tmp_path / "out" / name) > 100, name
  ids = torch.from_numpy(tok(PROMPTS, padding="max_length", max_length=77,
                             return_tensors="np").input_ids)

  def torch_scores(images):
    """(CLIP score, PickScore) in PyTorch: 100 max(cos, 0) and PickScore's reference code,
    exp(logit_scale) x cosine of the normalised embeddings."""
    pixels = (torch.from_numpy((images + 1) / 2) - torch.from_numpy(rewards.CLIP_MEAN)) / \
        torch.from_numpy(rewards.CLIP_STD)
    with torch.no_grad():
      cos = torch.nn.functional.cosine_similarity(
          clip.get_image_features(pixel_values=pixels.permute(0, 3, 1, 2).float()),
          clip.get_text_features(input_ids=ids))
    return float((100 * cos.clamp(min=0)).mean()), float((clip.logit_scale.exp() * cos).mean())

  base = base_models
  runs = {"2": pipeline.generate_images(base, PROMPTS, 2, 32, batch_size=2),
          "teacher_3": pipeline.generate_images(base, PROMPTS, 3, 32, batch_size=2,
                                                timesteps="leading", guidance_scale=5.0,
                                                negative_prompt="wider"),
          "lcm_2": pipeline.generate_images(
              pipeline.with_loras(base, str(tmp_path / "lcm_lora"), 0.8), PROMPTS, 2, 32,
              batch_size=2, sampler="lcm", timesteps="lcm")}
  for run, images in runs.items():
    clip_score, pickscore = torch_scores(images)
    np.testing.assert_allclose(results[run]["clip_score"], clip_score, atol=1e-3, err_msg=run)
    np.testing.assert_allclose(results[run]["pickscore"], pickscore, atol=1e-3, err_msg=run)
  assert results["2"]["pickscore"] != results["2"]["clip_score"]
  assert results["lcm_2"]["pickscore"] != results["2"]["pickscore"]
  assert "aesthetic" in results["1"]
