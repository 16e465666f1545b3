"""A tiny two-stage progressive MLCM run (K 4 -> 2) on 8 fake CPU devices, through the one
training loop; LoRAs exported per stage; a finished run is reused, not retrained."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest

import helpers

from configs import sdxl_mlcm
from mcm_jax.data import prompts as prompt_data
from mcm_jax.experiments import sdxl_mlcm as mlcm_experiment
from mcm_jax import lora as lora_lib
from mcm_jax.config_validation import validate
from mcm_jax.errors import ConfigError


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
  directory (tiny, random), a separate teacher UNet, captioned images in webdataset shards
  encoded by the VAE in the step (image-based MLCD: the guided teacher steps the noised latents), one stage with
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
  folder = helpers.image_folder(tmp_path / "images")
  config.images.dir = str(helpers.webdataset_shards(pathlib.Path(folder), tmp_path / "shards"))
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


@pytest.mark.slow  # two tiny full-UNet stages, then a PyTorch pipeline on the export
def test_guidance_conditioned_full_unet_student(tiny_sdxl_dir, tmp_path, monkeypatch):
  """LCM §4.2's student as a whole UNet (``trainable='unet'``, ``guidance_range``), two
  progressive stages on a tiny SDXL directory, the weights and Adam state sharded over fsdp = 2:
  each stage exports a diffusers UNet directory that diffusers' ``UNet2DConditionModel`` loads in
  full (no missing or unexpected weight; ``time_cond_proj_dim`` in its config) and that, in
  diffusers' SDXL pipeline with ``LCMScheduler``, samples what ``generate --unet`` samples from
  the same noise (the pipeline's fresh noise replaced by ours)."""
  torch = pytest.importorskip("torch")
  import diffusers  # pylint: disable=g-import-not-at-top
  import sdxl_fixtures  # pylint: disable=g-import-not-at-top
  from diffusers.schedulers import scheduling_lcm  # pylint: disable=g-import-not-at-top
  from mcm_jax import pipeline, seeds  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  config = sdxl_mlcm.get_config("tiny")
  (tmp_path / "prompts.txt").write_text("lower newer\nwider lowest\nnewer\nlow\n")
  config.update(student_unet=tiny_sdxl_dir, text_encoder="sdxl", trainable="unet",
                prompts=str(tmp_path / "prompts.txt"))
  config.mlcm.guidance_range = (3.0, 15.0)
  config.unet.time_cond_proj_dim = 16
  config.mesh.update(data=4, fsdp=2)
  config.train.steps = 2
  config.train.optim.learning_rate = 3e-3  # the embedding moves enough to change the images
  result = mlcm_experiment.run(config, str(tmp_path / "run"))
  stages = result["stages"]
  assert [os.path.basename(os.path.dirname(s["unet"])) for s in stages] == ["unet", "unet"]
  _, base = sdxl.load_unet(tiny_sdxl_dir)
  exported = [sdxl.load_unet(os.path.dirname(s["unet"]))[1] for s in stages]
  kernel = lambda p: np.asarray(p["time_embedding"]["cond_proj"]["kernel"])
  assert np.abs(kernel(exported[0])).max() > 0  # the guidance embedding was trained
  moved = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  exported_base = dict(exported[0], time_embedding=base["time_embedding"])
  assert moved(exported_base, base) > 0 and moved(exported[1], exported[0]) > 0
  unet_dir = os.path.dirname(stages[1]["unet"])
  torch_unet, info = diffusers.UNet2DConditionModel.from_pretrained(
      unet_dir, variant="fp16", output_loading_info=True)
  assert not any(info.values()), info  # every weight consumed, none missing
  assert torch_unet.config.time_cond_proj_dim == 16
  # Sampling: 2 LCM steps at w = 5, ours (generate --unet) against diffusers' pipeline.
  prompts = ["lower newer", "wider lowest"]
  models = pipeline.load_pipeline(tiny_sdxl_dir, unet_dir=unet_dir)
  ours, other_w = (pipeline.generate_images(models, prompts, 2, resolution=32, batch_size=2,
                                            timesteps="lcm", sampler="lcm", guidance_scale=w)
                   for w in (5.0, 12.0))
  noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0),
                                       (2, 16, 16, 4)))
  fresh = np.asarray(jax.random.normal(jax.random.fold_in(seeds.key(0, "sampler_noise"), 0),
                                       (1, 2, 16, 16, 4)))
  queue = [torch.from_numpy(fresh[0].transpose(0, 3, 1, 2).copy())]
  monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: queue.pop(0))
  reference = sdxl_fixtures.diffusers_sdxl_pipeline(
      tiny_sdxl_dir, unet=torch_unet.float().eval(), scheduler=diffusers.LCMScheduler(
          beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
  with torch.no_grad():
    theirs = reference(prompt=prompts, num_inference_steps=2, guidance_scale=5.0, height=32,
                       width=32, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                       output_type="np").images
  assert not queue  # the re-noising draw was ours
  np.testing.assert_allclose((ours + 1) / 2, theirs, atol=1e-4)
  # w reaches the images through the trained embedding, by more than ours and theirs differ
  gap, w_effect = np.abs((ours + 1) / 2 - theirs).mean(), np.abs(ours - other_w).mean() / 2
  assert gap < 0.1 * w_effect, (gap, w_effect)


def test_mlcm_config_errors():
  from configs import sdxl_lcm  # pylint: disable=g-import-not-at-top
  for size in sdxl_lcm.SIZES:  # LCM's guidance-conditioned full-UNet student is a valid config
    validate(sdxl_lcm.get_config(size))
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
  for fields, message in [
      (dict(trainable="all"), r"trainable='all' is invalid.*'lora', 'unet'"),
      (dict(mlcm={"guidance_range": (3.0, 15.0)}),
       r"guidance_range=\(3.0, 15.0\) conditions .* LoRA cannot train.*trainable='unet'"),
      (dict(trainable="unet", mlcm={"guidance_range": (15.0, 3.0)}),
       r"guidance_range=\(15.0, 3.0\) is invalid.*1 <= w_min <= w_max"),
      (dict(trainable="unet", mlcm={"guidance_range": (3.0, 15.0), "bank": {"dir": "/b"}}),
       r"bank.dir='/b': a trajectory bank is made at the fixed guidance_scale"),
      (dict(trainable="unet", mlcm={"guidance_range": (3.0, 15.0)},
            unet={"time_cond_proj_dim": 1}), r"time_cond_proj_dim=1 is invalid")]:
    config = sdxl_mlcm.get_config("tiny")
    config.update(fields)
    with pytest.raises(ConfigError, match=message):
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
