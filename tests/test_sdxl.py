"""SDXL UNet in Flax == diffusers' PyTorch UNet on the same tiny random weights; loading errors."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdxl_fixtures  # tests/: torch is imported inside its functions
from mcm_jax.models import sdxl, sdxl_text, sdxl_unet
from sdxl_fixtures import tiny_torch_unet, tiny_torch_vae  # pylint: disable=g-bad-import-order

warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")


def tiny_inputs(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  c = sdxl.TINY_UNET_CONFIG
  return dict(z=rng.normal(size=(batch, 16, 16, 4)).astype(np.float32),
              t=np.array([999, 421][:batch], np.int64),
              cond=dict(context=rng.normal(size=(batch, 7, c["cross_attention_dim"])).astype(
                            np.float32),
                        text_embeds=rng.normal(size=(batch, 32)).astype(np.float32),
                        time_ids=np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32),
                                         (batch, 1))))


def torch_eps(unet, inputs):
  import torch  # pylint: disable=g-import-not-at-top
  cond = inputs["cond"]
  with torch.no_grad():
    out = unet(torch.from_numpy(inputs["z"]).permute(0, 3, 1, 2), torch.from_numpy(inputs["t"]),
               torch.from_numpy(cond["context"]),
               added_cond_kwargs={"text_embeds": torch.from_numpy(cond["text_embeds"]),
                                  "time_ids": torch.from_numpy(cond["time_ids"])}).sample
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(name="unet_dir")
def _unet_dir(tiny_sdxl_dir):
  """An SDXL root whose unet/ is ``tiny_torch_unet()`` (seed 0): conftest's shared directory,
  read-only (tests write their variants under their own tmp_path)."""
  return tiny_sdxl_dir


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_flax_unet_equals_pytorch_unet(unet_dir, tmp_path):
  model, params = sdxl.load_unet(unet_dir)  # an SDXL root with unet/ (safetensors)
  inputs = tiny_inputs()
  want = torch_eps(tiny_torch_unet(), inputs)
  eps = jax.jit(sdxl.make_eps_fn(model))
  got = np.asarray(eps(params, inputs["z"], inputs["t"], inputs["cond"]))
  assert np.abs(want).mean() > 0.05
  # float32 rounding only (the GELU's exactness: test_sdxl_unet's GEGLU test)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-5
  # The Flax layout (msgpack) loads to the same parameters.
  from flax import serialization  # pylint: disable=g-import-not-at-top
  flax_dir = str(tmp_path / "flax_unet")  # not inside the shared directory
  os.makedirs(flax_dir)
  with open(os.path.join(unet_dir, "unet", "config.json")) as f:
    json.dump(json.load(f), open(os.path.join(flax_dir, "config.json"), "w"))
  with open(os.path.join(flax_dir, sdxl.FLAX_WEIGHTS), "wb") as f:
    f.write(serialization.msgpack_serialize(jax.device_get(sdxl_unet.unstack_blocks(params))))
  _, again = sdxl.load_unet(flax_dir)
  assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: bool(jnp.array_equal(a, b)), params, again)))


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_guidance_conditioned_unet_equals_pytorch(tmp_path):
  """LCM's guidance-conditioned student (LCM §4.2): a UNet with ``time_cond_proj_dim`` takes
  ``timestep_cond = guidance.scale_embedding(w - 1)`` through its time embedding's ``cond_proj``,
  as diffusers' PyTorch UNet and SDXL pipeline compute it; loaded from a PyTorch save."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from mcm_jax import guidance  # pylint: disable=g-import-not-at-top
  torch.manual_seed(3)
  unet = UNet2DConditionModel(**sdxl.TINY_UNET_CONFIG, time_cond_proj_dim=17).eval()
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.02 * torch.randn_like(p))
  unet.save_pretrained(str(tmp_path / "unet"))
  w = np.array([2.0, 7.5], np.float32)  # guidance scales; LCM's omega = w - 1
  emb = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w - 1), 17)
  np.testing.assert_allclose(guidance.scale_embedding(w - 1, 17), emb.numpy(), atol=2e-5)
  inputs = tiny_inputs()
  cond = inputs["cond"]
  with torch.no_grad():
    want = unet(torch.from_numpy(inputs["z"]).permute(0, 3, 1, 2), torch.from_numpy(inputs["t"]),
                torch.from_numpy(cond["context"]), timestep_cond=emb,
                added_cond_kwargs={"text_embeds": torch.from_numpy(cond["text_embeds"]),
                                   "time_ids": torch.from_numpy(cond["time_ids"])}
                ).sample.permute(0, 2, 3, 1).numpy()
  model, params = sdxl.load_unet(str(tmp_path / "unet"))
  assert params["time_embedding"]["cond_proj"]["kernel"].shape == (17, 32)
  eps = jax.jit(sdxl.make_eps_fn(model))
  got = eps(params, inputs["z"], inputs["t"], dict(cond, timestep_cond=guidance.scale_embedding(
      w - 1, 17)))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-5
  other = eps(params, inputs["z"], inputs["t"], dict(cond, timestep_cond=guidance.scale_embedding(
      w[::-1] - 1, 17)))
  assert np.linalg.norm(other - want) / np.linalg.norm(want) > 1e-3  # the scale matters


def test_unet_loading_errors_name_the_weight(unet_dir, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  weights = load_file(os.path.join(unet_dir, "unet", sdxl.PT_WEIGHTS[0]))
  config = open(os.path.join(unet_dir, "unet", "config.json")).read()

  def write(name, tensors):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config)
    save_file(tensors, str(d / sdxl.PT_WEIGHTS[0]))
    return str(d)

  key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
  bad = dict(weights, **{key: np.zeros((64, 32), np.float32)})
  with pytest.raises(ValueError, match=r"to_q.weight.*shape \(64, 32\)"):
    sdxl.load_unet(write("shape", bad))
  missing = {k: v for k, v in weights.items() if not k.startswith("mid_block.")}
  with pytest.raises(ValueError, match=r"lack \d+ parameters.*mid_block"):
    sdxl.load_unet(write("missing", missing))
  with pytest.raises(FileNotFoundError, match="no unet config.json"):
    sdxl.load_unet(str(tmp_path / "nowhere"))
  sd15 = write("sd15", weights)  # another architecture's config (SD 1.5: no text_time)
  cfg = json.loads(config)
  cfg.pop("addition_embed_type")
  (tmp_path / "sd15" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"sd15/config.json: not an SDXL unet config.*"
                     r"addition_embed_type=None"):
    sdxl.load_unet(sd15)
  with pytest.raises(ValueError, match="norm_num_groups=8"):
    sdxl.unet_from_config(dict(sdxl.TINY_UNET_CONFIG, norm_num_groups=8))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's zero-copy hand-over")
def test_loaded_weights_are_handed_to_jax_without_a_copy():
  """The loaders fill ``host_buffer``s and hand them over with ``to_device``: on XLA:CPU the
  device buffer is the host array itself, so a loaded SDXL holds one copy of its weights."""
  host = sdxl.host_buffer((3, 1000), np.float16)
  assert host.ctypes.data % 64 == 0 and host.shape == (3, 1000) and host.dtype == np.float16
  host[...] = np.arange(3000).reshape(3, 1000)
  array = sdxl.to_device(host)
  assert array.unsafe_buffer_pointer() == host.ctypes.data
  np.testing.assert_array_equal(array, host)


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_lora_export_loads_in_pytorch_diffusers_with_the_same_output(unet_dir, tmp_path):
  from diffusers import StableDiffusionXLPipeline  # pylint: disable=g-import-not-at-top
  from mcm_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  model, params = sdxl.load_unet(unet_dir)
  lora = lora_lib.init_lora(params, rank=4, rng=jax.random.PRNGKey(1))
  # 8 transformer blocks (down 1x2, mid 1x2, up 2x2) x (attn1, attn2) x (q, k, v, out)
  assert len(lora) == 8 * 2 * 4
  lora = {p: {"a": ab["a"], "b": 0.1 * jax.random.normal(jax.random.PRNGKey(i), ab["b"].shape)}
          for i, (p, ab) in enumerate(sorted(lora.items()))}
  scale = 0.7
  eps = jax.jit(sdxl.make_eps_fn(model))
  inputs = tiny_inputs()
  base_out = np.asarray(eps(params, inputs["z"], inputs["t"], inputs["cond"]))
  got = np.asarray(eps(lora_lib.attach(params, lora, scale), inputs["z"], inputs["t"],
                       inputs["cond"]))
  assert np.abs(got - base_out).max() > 1e-2  # the adapter changes the function

  directory = lora_lib.save(str(tmp_path / "lora"), lora, scale)
  # What StableDiffusionXLPipeline.load_lora_weights does for the UNet:
  state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(
      str(tmp_path / "lora"), weight_name=lora_lib.LORA_FILE)
  unet = tiny_torch_unet()
  StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet)
  want = torch_eps(unet, inputs)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)

  back = lora_lib.load(directory, params)  # import: scale folded into b
  again = np.asarray(eps(lora_lib.attach(params, back), inputs["z"], inputs["t"], inputs["cond"]))
  np.testing.assert_allclose(again, got, atol=1e-5)
  assert os.path.isfile(tmp_path / "lora" / "lora_kohya.safetensors")  # the second export


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_text_encoders_equal_pytorch_transformers(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  # Its own encoders, wider than the shared directory's (32 + 48, so the two widths differ).
  one, two = sdxl_fixtures.write_text_components(str(tmp_path))
  encode = sdxl_text.load_text_encoders(str(tmp_path))
  prompts = ["lower newer", "", "wider lowest lowest"]
  got = encode(prompts)
  tok = sdxl_fixtures.write_tokenizer(str(tmp_path / "tok_copy"))
  context, pooled = sdxl_fixtures.torch_text_embeddings(one, two, tok, prompts)
  assert got["context"].shape == (3, 77, 32 + 48) and got["text_embeds"].shape == (3, 32)
  np.testing.assert_allclose(got["context"], context, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["text_embeds"], pooled, atol=1e-4, rtol=0)
  assert np.abs(got["text_embeds"][0] - got["text_embeds"][2]).max() > 1e-3
  with pytest.raises(FileNotFoundError, match="text_encoder"):
    sdxl_text.load_text_encoders(str(tmp_path / "nowhere"))


def test_vae_decoder_equals_pytorch(tiny_sdxl_dir):
  torch = pytest.importorskip("torch")
  vae = tiny_torch_vae()  # what the shared directory's vae/ holds (seed 0)
  model, params = sdxl.load_vae(tiny_sdxl_dir)
  latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  got = np.asarray(jax.jit(sdxl.make_decoder(model))(params, latents))
  with torch.no_grad():
    want = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2) / 0.13025).sample
  want = want.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
  assert got.shape == (2, 16, 16, 3) and np.abs(want).mean() > 0.05
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_vae_encoder_equals_pytorch(tiny_sdxl_dir):
  """The latents images become (``sdxl.make_encoder``): diffusers' ``latent_dist.mode()`` (the
  posterior mean) times the scaling factor, and ``mean + std eps`` for a given ``eps``."""
  torch = pytest.importorskip("torch")
  vae = tiny_torch_vae()
  model, params = sdxl.load_vae(tiny_sdxl_dir)
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  eps = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  encode = jax.jit(sdxl.make_encoder(model))
  with torch.no_grad():
    posterior = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()
    want = 0.13025 * nhwc(posterior.mode())
    want_sample = 0.13025 * nhwc(posterior.mean + posterior.std * torch.from_numpy(eps).permute(
        0, 3, 1, 2))
  assert sdxl.vae_scale_factor(tiny_sdxl_dir) == 2 and np.abs(want).mean() > 1e-3
  np.testing.assert_allclose(encode(params, images), want, atol=1e-5)
  np.testing.assert_allclose(encode(params, images, eps), want_sample, atol=1e-5)


@pytest.mark.slow  # PyTorch equivalence at SDXL's structure, ~30 s
def test_sdxl_structure_unet_and_its_lora_equal_pytorch(tmp_path):
  """At SDXL's exact block structure (sdxl_fixtures.sdxl_structure_config, reduced widths): the
  loaded UNet equals diffusers' PyTorch UNet (float32, relative L2), the default LoRA has SDXL's
  560 modules, and diffusers' ``load_lora_into_unet`` wraps all 560 from the export and gives
  the same eps as the LoRA applied unmerged here."""
  from diffusers import StableDiffusionXLPipeline  # pylint: disable=g-import-not-at-top
  from mcm_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  torch_unet = sdxl_fixtures.structure_torch_unet().half()  # fp16 files, as most downloads
  torch_unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=True, variant="fp16")
  torch_unet = torch_unet.float()  # the same fp16-rounded weights, computing in float32
  rng = np.random.default_rng(1)
  inputs = dict(z=rng.normal(size=(1, 16, 16, 4)).astype(np.float32), t=np.array([621]),
                cond=dict(context=rng.normal(size=(1, 77, 32)).astype(np.float32),
                          text_embeds=rng.normal(size=(1, 32)).astype(np.float32),
                          time_ids=np.array([[128, 128, 0, 0, 128, 128]], np.float32)))
  want = torch_eps(torch_unet, inputs)
  model, params = sdxl.load_unet(str(tmp_path))
  eps = jax.jit(sdxl.make_eps_fn(model))
  got = np.asarray(eps(params, inputs["z"], inputs["t"], inputs["cond"]))
  # float32 rounding; diffusers' Flax UNet (tanh-approximate GELU) is ~50x further from PyTorch
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-5

  lora = lora_lib.init_lora(params, rank=4, rng=jax.random.PRNGKey(1))
  assert len(lora) == 560  # 70 transformer blocks x (attn1, attn2) x (q, k, v, out)
  lora = {p: {"a": ab["a"], "b": 0.3 * jax.random.normal(jax.random.PRNGKey(i), ab["b"].shape)}
          for i, (p, ab) in enumerate(sorted(lora.items()))}
  got_lora = np.asarray(eps(lora_lib.attach(params, lora, 0.7), inputs["z"], inputs["t"],
                            inputs["cond"]))
  assert np.linalg.norm(got_lora - got) / np.linalg.norm(got) > 1e-2  # the LoRA matters
  lora_lib.save(str(tmp_path / "lora"), lora, 0.7)
  state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(
      str(tmp_path / "lora"), weight_name=lora_lib.LORA_FILE)
  StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, torch_unet)
  assert sum(1 for m in torch_unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)) == 560
  want_lora = torch_eps(torch_unet, inputs)
  delta, want_delta = got_lora - got, want_lora - want
  assert np.linalg.norm(delta - want_delta) / np.linalg.norm(want_delta) < 1e-4

  # A full UNet exported (sdxl.save_unet) is diffusers' fp16 file again, tensor for tensor.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = sdxl.save_unet(str(tmp_path / "export"), model, params, "float16")
  assert os.path.basename(path) == "diffusion_pytorch_model.fp16.safetensors"
  written = load_file(path)
  original = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
  assert written.keys() == original.keys() and len(written) == 1680
  for name, value in original.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)
  config = json.load(open(tmp_path / "export" / "config.json"))
  assert config["transformer_layers_per_block"] == [1, 2, 10]


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_text_encoders_read_the_fp16_variant_and_name_a_missing_tokenizer(tmp_path):
  """``model.fp16.safetensors`` only (what ``variant="fp16"`` downloads): the encoders equal
  transformers' PyTorch ones on the same fp16-rounded weights; no tokenizer_2/ is named."""
  import shutil  # pylint: disable=g-import-not-at-top
  one, two = sdxl_fixtures.tiny_text_encoders(0, (32, 48))
  one, two = one.half(), two.half()
  one.save_pretrained(str(tmp_path / "text_encoder"), variant="fp16")
  two.save_pretrained(str(tmp_path / "text_encoder_2"), variant="fp16")
  assert sorted(os.listdir(tmp_path / "text_encoder")) == ["config.json",
                                                           "model.fp16.safetensors"]
  for name in ("tokenizer", "tokenizer_2"):
    tok = sdxl_fixtures.write_tokenizer(str(tmp_path / name))
  prompts = ["lower newer", "", "wider lowest lowest"]
  got = sdxl_text.load_text_encoders(str(tmp_path))(prompts)
  context, pooled = sdxl_fixtures.torch_text_embeddings(one.float(), two.float(), tok, prompts)
  np.testing.assert_allclose(got["context"], context, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["text_embeds"], pooled, atol=1e-4, rtol=0)
  shutil.rmtree(tmp_path / "tokenizer_2")
  with pytest.raises(FileNotFoundError, match="has no tokenizer_2/"):
    sdxl_text.load_text_encoders(str(tmp_path))
