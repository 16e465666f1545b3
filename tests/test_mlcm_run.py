"""A tiny two-stage progressive MLCM run (K 4 -> 2) on 8 fake CPU devices, through the one
training loop; LoRAs exported per stage; a finished run is reused, not retrained."""
import json
import os

import jax
import numpy as np
import pytest

import helpers

from configs import sdxl_mlcm
from mcm_jax.data import prompts as prompt_data
from mcm_jax.experiments import sdxl_mlcm as mlcm_experiment
from mcm_jax import lora as lora_lib
from mcm_jax.config_validation import ConfigError, validate


@pytest.mark.slow  # two tiny SDXL-architecture stages end to end
def test_two_stage_progressive_run(tmp_path):
  assert jax.device_count() == 8
  config = sdxl_mlcm.get_config("tiny")
  result = mlcm_experiment.run(config, str(tmp_path))
  stages = result["stages"]
  assert [(s["num_segments"], s["skip"]) for s in stages] == [(4, 20), (2, 40)]
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  for name in ("mlcm_stage0_K4/loss", "mlcm_stage1_K2/loss"):
    values = [l[name] for l in lines if name in l]
    assert len(values) == config.train.steps and np.all(np.isfinite(values)), name
  params = mlcm_experiment.build_models(config)[1]
  first, second = (lora_lib.load(s["lora"], params) for s in stages)
  assert first.keys() == second.keys()
  # Each stage also exports the kohya file (float16) users put in ComfyUI / A1111: same deltas.
  kohya = lora_lib.load(os.path.join(os.path.dirname(stages[1]["lora"]),
                                     "mlcm_stage1_K2_kohya.safetensors"), params)
  for k, ab in second.items():
    np.testing.assert_allclose(kohya[k]["a"] @ kohya[k]["b"], ab["a"] @ ab["b"], atol=1e-3)
  # Stage 1 starts from stage 0's LoRA and trains it further; B left zero would mean no update.
  diff = max(float(np.abs(np.asarray(first[k]["b"]) - np.asarray(second[k]["b"])).max())
             for k in first)
  assert diff > 0 and max(float(np.abs(np.asarray(v["b"])).max()) for v in first.values()) > 0
  assert os.path.getsize(tmp_path / "stage1" / "latents_2step.png") > 100
  again = mlcm_experiment.run(config, str(tmp_path))  # finished stages are restored, not retrained
  assert again == result
  assert len(open(tmp_path / "metrics.jsonl").readlines()) == len(lines)


@pytest.mark.slow  # a stage end to end with the reward losses
def test_stage_on_a_tiny_sdxl_directory(tiny_sdxl_dir, tiny_imagereward, tmp_path):
  """The real component path: UNet, CLIP text encoders + tokenizers and VAE from a local SDXL
  directory (tiny, random), a separate teacher UNet, a folder of captioned images encoded by the
  VAE in the step (image-based MLCD: the guided teacher steps the noised latents), one stage with
  the reward losses (ImageReward, tiny, scoring each image against its prompt); samples decoded
  by the VAE."""
  import sdxl_fixtures  # pylint: disable=g-import-not-at-top
  sdxl_dir = tiny_sdxl_dir  # shared, read-only: the run writes only under tmp_path
  config = sdxl_mlcm.get_config("tiny")
  # The teacher: another SDXL-architecture checkpoint (as MLCM distils a fine-tune's trajectories).
  sdxl_fixtures.tiny_torch_unet(seed=1).save_pretrained(tmp_path / "teacher" / "unet",
                                                        safe_serialization=True)
  config.update(student_unet=sdxl_dir, teacher_unet=str(tmp_path / "teacher"),
                text_encoder="sdxl", prompts="")
  config.mlcm.source = "images"  # the captions are the prompts
  config.images.dir = helpers.image_folder(tmp_path / "images")
  config.rewards.update(scorer="imagereward", imagereward_dir=str(tiny_imagereward.dir))
  config.mlcm.num_stages = 1
  config.train.steps = 2
  result = mlcm_experiment.run(config, str(tmp_path / "run"))
  assert os.path.isfile(result["stages"][0]["lora"])
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  for key in ("mlcd", "reward_consistency", "feedback"):
    assert np.isfinite(lines[-1][f"mlcm_stage0_K4/{key}"]), key
  assert lines[-1]["mlcm_stage0_K4/mlcd"] > 0
  # The feedback hinge is active (a random ImageReward scores below its s0 = 2).
  assert lines[-1]["mlcm_stage0_K4/feedback"] > 0.0
  assert os.path.getsize(tmp_path / "run" / "stage0" / "samples_4step.png") > 100


@pytest.mark.slow  # a tiny stage from images end to end
def test_lcf_from_a_lora_on_cached_latents(tiny_sdxl_dir, tmp_path):
  """LCF (configs/sdxl_lcf.py): a LoRA file fine-tuned on a caption folder's cached VAE latents
  with no teacher. The cache holds the VAE's latents; the run starts from the file's LoRA.
  (Images encoded in the step: ``test_stage_on_a_tiny_sdxl_directory``.)"""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import sdxl_lcf  # pylint: disable=g-import-not-at-top
  from mcm_jax.data import image_captions, latent_cache, loader  # pylint: disable=g-import-not-at-top
  from mcm_jax.data import trajectory_bank  # pylint: disable=g-import-not-at-top
  from mcm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  config = sdxl_lcf.get_config("tiny")
  folder = helpers.image_folder(tmp_path / "images")
  config.update(student_unet=tiny_sdxl_dir)
  config.images.update(dir=folder, cache_dir=str(tmp_path / "latents"))
  # the distilled student LCF starts from: a LoRA with B != 0 in a file; trained at scale 0.5
  _, params = sdxl.load_unet(tiny_sdxl_dir)
  start = lora_lib.init_lora(params, config.lora.rank, jax.random.PRNGKey(3))
  start = {k: {"a": v["a"], "b": 0.1 + v["b"]} for k, v in start.items()}
  lora_lib.save(str(tmp_path / "start"), start)
  config.lora.update(init_from=str(tmp_path / "start"), scale=0.5)
  first = mlcm_experiment.starting_lora(config, params)
  for k, v in start.items():  # attached at scale 0.5 it is the file's LoRA at scale 1
    np.testing.assert_allclose(first[k]["a"] @ (0.5 * first[k]["b"]), v["a"] @ v["b"], atol=1e-6)
  result = mlcm_experiment.run(config, str(tmp_path / "lcf"))
  lines = [json.loads(l) for l in open(tmp_path / "lcf" / "metrics.jsonl")]
  assert len([l for l in lines if "mlcm_stage0_K4/loss" in l]) == config.train.steps
  trained = lora_lib.load(result["stages"][0]["lora"], params)
  assert max(float(np.abs(np.asarray(trained[k]["b"]) - 0.5 * first[k]["b"]).max())
             for k in start) > 0
  # The cache holds the VAE's latents (posterior mean x scaling factor) of the 16 px images.
  images = image_captions.ImageCaptionFolder(folder, 16)
  bank = trajectory_bank.Bank(config.images.cache_dir, fields=latent_cache.FIELDS)
  cached = loader.read(latent_cache.LatentCache(bank, images), range(6))["x"]
  vae, vae_params = sdxl.load_vae(tiny_sdxl_dir)
  want = sdxl.make_encoder(vae)(vae_params, jnp.asarray(loader.read(images, range(6))["x"]))
  np.testing.assert_allclose(cached, want, atol=1e-5)
  assert cached.shape == (6, 8, 8, 4)
  with pytest.raises(UserError, match=r"latent cache .* other settings.*'resolution': \(16, 32\)"):
    latent_cache.open_or_build(config.images.cache_dir, image_captions.ImageCaptionFolder(
        folder, 32), None, tiny_sdxl_dir, 8, None)
  config.lora.rank = 8
  with pytest.raises(UserError, match=r"init_from=.*\(A, B\) shapes \(\(64, 4\), \(4, 64\)\) in "
                     r"the file, \(\(64, 8\), \(8, 64\)\) configured.*lora.rank"):
    mlcm_experiment.starting_lora(config, params)


def test_mlcm_config_errors():
  config = sdxl_mlcm.get_config("tiny")
  config.mlcm.num_segments = 3
  with pytest.raises(ConfigError, match=r"num_segments=3 is invalid.*divisible by 2"):
    validate(config)
  config = sdxl_mlcm.get_config("tiny")
  config.mlcm.teacher_mode = "ema"
  with pytest.raises(ConfigError, match=r"teacher_mode='ema'.*'updated', 'fixed'"):
    validate(config)
  config = sdxl_mlcm.get_config("tiny")
  config.mlcm.skip = 300
  with pytest.raises(ConfigError, match=r"skip=300 is invalid"):
    validate(config)


@pytest.mark.slow  # a stage end to end that fills the bank
def test_trajectory_bank_pairs_are_teacher_steps(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mcm_jax import mlcm  # pylint: disable=g-import-not-at-top
  from mcm_jax.data import trajectory_bank  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  config = sdxl_mlcm.get_config("tiny")
  config.mlcm.num_stages = 1
  config.mlcm.bank.update(dir=str(tmp_path / "bank"), entries=16)
  config.train.steps = 2
  mlcm_experiment.run(config, str(tmp_path / "run"))
  bank = trajectory_bank.Bank(config.mlcm.bank.dir, mlcm_experiment.bank_settings(config))
  assert len(bank) == 16
  e = bank.get(np.arange(4))
  assert np.all((e["t_n"] >= e["seg_start"]) & (e["t_n"] < e["t_m"]))
  # Recompute z_tn = one guided-teacher DDIM step from the stored z_tm: the bank holds exactly it.
  model, params, _, encode = mlcm_experiment.build_models(config)
  eps = sdxl.make_eps_fn(model)
  prompts = prompt_data.builtin_prompts()
  cond = encode([prompts[i] for i in e["prompt_index"]])
  cond["time_ids"] = sdxl.time_ids(config.latent_resolution * 8, 4)
  uncond = encode([""] * 4)
  uncond["time_ids"] = cond["time_ids"]
  def guided(z, t):  # eq. 8 on eps, then x_hat = (z - sigma eps) / alpha
    e_c, e_u = eps(params, z, t, cond), eps(params, z, t, uncond)
    a, s = mlcm.alpha_sigma(t)
    return (z - s[:, None, None, None] * (e_u + 8.0 * (e_c - e_u))) / a[:, None, None, None]

  z_tn = mlcm.teacher_step(guided, jnp.asarray(e["z_tm"]), jnp.asarray(e["t_m"]),
                           jnp.asarray(e["t_n"]))
  np.testing.assert_allclose(z_tn, e["z_tn"], atol=1e-4)
  config.mlcm.skip = 10  # the same bank directory, other settings
  with pytest.raises(ValueError, match=r"other settings.*'skip': \(20, 10\)"):
    mlcm_experiment.run(config, str(tmp_path / "run2"))


@pytest.mark.slow  # loads the tiny CLIP text encoders
def test_unconditional_branch_follows_the_pipeline_config(tiny_sdxl_dir, tmp_path):
  """SDXL's force_zeros_for_empty_prompt (model_index.json; default true) makes the guided
  teacher's unconditional branch zero prompt embeddings; false, or mlcm.uncond='empty_prompt',
  makes it the text encoders' embedding of ""."""
  import shutil  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl, sdxl_text  # pylint: disable=g-import-not-at-top
  encode = sdxl_text.load_text_encoders(tiny_sdxl_dir)
  empty = encode([""])
  assert np.abs(empty["context"]).max() > 1e-3  # CLIP("") is not zeros
  config = sdxl_mlcm.get_config("tiny")
  config.student_unet = tiny_sdxl_dir  # no model_index.json: the pipeline's default, zeros
  encode_batch = lambda texts: dict(encode(texts), time_ids=sdxl.time_ids(64, len(texts)))
  zeros = mlcm_experiment.unconditional(config, encode_batch)
  assert not np.any(zeros["context"]) and not np.any(zeros["text_embeds"])
  np.testing.assert_array_equal(zeros["time_ids"], sdxl.time_ids(64, 1))
  config.mlcm.uncond = "empty_prompt"
  np.testing.assert_array_equal(mlcm_experiment.unconditional(config, encode_batch)["context"],
                                empty["context"])
  own = tmp_path / "sdxl"
  shutil.copytree(tiny_sdxl_dir, own)
  (own / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
  config.update(student_unet=str(own))
  config.mlcm.uncond = "auto"
  assert mlcm_experiment.uncond_mode(config) == "empty_prompt"
  assert mlcm_experiment.bank_settings(config)["uncond"] == "empty_prompt"
