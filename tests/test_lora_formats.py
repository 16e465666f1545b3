"""LoRA layouts users meet (PEFT, diffusers' older layout, kohya for ComfyUI / A1111 / kohya, with
diffusers' or the original SDXL module names; LoRAs of Dense and convolution layers), proven with
diffusers' own converters and PyTorch UNet on the tiny SDXL-architecture UNet."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import sdxl_fixtures  # tests/: torch is imported inside its functions
from mcm_jax import lora as lora_lib
from mcm_jax import lora_formats
from mcm_jax.errors import UserError
from mcm_jax.models import sdxl
from test_sdxl import tiny_inputs, torch_eps  # pylint: disable=g-bad-import-order

TARGETS_TORCH = ["to_q", "to_k", "to_v", "to_out.0"]


def _random_lora(params, rank=4, seed=1, convs=False):
  """b ~ 0.1 N(0, 1) on ``init_lora``'s attention projections and, with ``convs``, also on every
  convolution kernel [kh, kw, in, out] (a [kh, kw, in, r] ~ N(0, 1 / (kh kw in)))."""
  lora = lora_lib.init_lora(params, rank=rank, rng=jax.random.PRNGKey(seed))
  for i, (k, v) in enumerate(sorted(flatten_dict(params).items()) if convs else ()):
    if k[-1] == "kernel" and v.ndim == 4:
      a = jax.random.normal(jax.random.PRNGKey(100 + i), v.shape[:-1] + (rank,))
      lora["/".join(k[:-1])] = {"a": a / np.sqrt(np.prod(v.shape[:-1])),
                                "b": jnp.zeros((rank, v.shape[-1]))}
  return {p: {"a": ab["a"], "b": 0.1 * jax.random.normal(jax.random.PRNGKey(i), ab["b"].shape)}
          for i, (p, ab) in enumerate(sorted(lora.items()))}


def _jax_eps(model, params, inputs):
  eps = jax.jit(sdxl.make_eps_fn(model))
  return np.asarray(eps(params, inputs["z"], inputs["t"], inputs["cond"]))


def _kernel_modules(unet):
  """PyTorch names of the UNet's Linear and Conv2d modules: those with a Flax kernel."""
  import torch  # pylint: disable=g-import-not-at-top
  return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.slow  # PyTorch equivalence, seconds
@pytest.mark.parametrize("convs", [False, True], ids=["attention", "with_convolutions"])
def test_kohya_export_is_diffusers_converter_output_and_loads_in_pytorch(tiny_sdxl_dir,
                                                                          tmp_path, convs):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model, params = sdxl.load_unet(tiny_sdxl_dir)
  lora, scale = _random_lora(params, convs=convs), 0.7
  kohya = lora_formats.to_kohya(lora, scale)
  # (a) an independent converter: diffusers' own PEFT -> kohya on our PEFT export.
  want = convert_state_dict_to_kohya({k: torch.from_numpy(v) for k, v in
                                      lora_formats.to_peft(lora, scale).items()})
  assert sorted(kohya) == sorted(want) and len(kohya) == 3 * len(lora)
  for key, value in want.items():
    np.testing.assert_array_equal(kohya[key], value.numpy(), err_msg=key)
  # (b) PyTorch diffusers loading the kohya file gives the JAX output of the merged LoRA.
  save_file(kohya, str(tmp_path / "lora_kohya.safetensors"))
  pipe = diffusers.StableDiffusionXLPipeline
  state_dict, alphas = pipe.lora_state_dict(str(tmp_path), weight_name="lora_kohya.safetensors")
  unet = sdxl_fixtures.tiny_torch_unet()
  pipe.load_lora_into_unet(state_dict, alphas, unet)
  inputs = tiny_inputs()
  got = _jax_eps(model, lora_lib.attach(params, lora, scale), inputs)
  assert np.abs(got - _jax_eps(model, params, inputs)).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(got, torch_eps(unet, inputs), atol=2e-4, rtol=0)
  # Reading it back (alpha / r folded in) gives the same merged UNet.
  back = lora_formats.from_state_dict(kohya, params)
  np.testing.assert_allclose(_jax_eps(model, lora_lib.attach(params, back), inputs), got,
                             atol=1e-5)


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_a_pytorch_made_lora_imports_in_every_layout(tiny_sdxl_dir):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # pylint: disable=g-import-not-at-top
  model, params = sdxl.load_unet(tiny_sdxl_dir)
  unet = sdxl_fixtures.tiny_torch_unet()
  # lora_alpha = 2 r: PyTorch applies 2 * B A; kohya's alpha / r carries the factor.
  unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS_TORCH,
                                   init_lora_weights=False))
  inputs = tiny_inputs()
  want = torch_eps(unet, inputs)
  peft_sd = {f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(unet).items()}
  kohya = {k: v for k, v in convert_state_dict_to_kohya(peft_sd).items()}
  for key in [k for k in kohya if k.endswith(".alpha")]:
    kohya[key] = torch.tensor(8)  # the adapter's lora_alpha, as kohya stores it
  old = {k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight",
                                                                 "lora.up.weight"): v
         for k, v in peft_sd.items()}
  old.update({k.replace("lora_A.weight", "alpha"): torch.tensor(8.0)
              for k in peft_sd if k.endswith("lora_A.weight")})
  for layout, state_dict in (("kohya", kohya), ("diffusers_old", old)):
    state_dict = {k: v.detach().numpy() for k, v in state_dict.items()}
    assert lora_formats.detect(state_dict) == layout
    lora = lora_formats.from_state_dict(state_dict, params)
    np.testing.assert_allclose(_jax_eps(model, lora_lib.attach(params, lora), inputs), want,
                               atol=2e-4, rtol=0, err_msg=layout)


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_a_pytorch_lora_of_convolutions_imports_with_diffusers_and_sdxl_names(tiny_sdxl_dir,
                                                                              tmp_path):
  """A peft LoRA of every Linear and Conv2d of the UNet (resnet convs, down/upsamplers, conv_in /
  conv_out, embeddings, attention; as LCM-LoRA SDXL and kohya LoRAs adapt), saved by diffusers'
  kohya converter (a) with diffusers' module names and (b) renamed to the original SDXL names
  kohya's trainer writes (``ldm_names``), loads from both files into JAX with PyTorch's output;
  diffusers' own converter reads every key of (b) as the module ``ldm_names`` maps it from, and
  PyTorch diffusers loading (b) gives the same output."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model, params = sdxl.load_unet(tiny_sdxl_dir)
  unet = sdxl_fixtures.tiny_torch_unet()
  modules = _kernel_modules(unet)
  convs = [n for n in modules if isinstance(unet.get_submodule(n), torch.nn.Conv2d)]
  unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules,
                                   init_lora_weights=False))
  # A third of peft's random B: at full size (on all 125 modules) the activations grow and the
  # float32 differences between the frameworks reach 3e-4.
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if "lora_B" in name:
        p.mul_(0.3)
  inputs = tiny_inputs()
  want = torch_eps(unet, inputs)
  peft_sd = {f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(unet).items()}
  kohya = {k: np.asarray(8.0) if k.endswith(".alpha") else v.detach().numpy()  # lora_alpha
           for k, v in convert_state_dict_to_kohya(peft_sd).items()}
  save_file(kohya, str(tmp_path / "diffusers_names.safetensors"))
  lora = lora_lib.load(str(tmp_path / "diffusers_names.safetensors"), params)
  assert len(lora) == len(modules) and len(convs) > 10
  assert sorted(p for p, ab in lora.items() if np.ndim(ab["a"]) == 4) == sorted(
      map(lora_formats.flax_path, convs))
  got = _jax_eps(model, lora_lib.attach(params, lora), inputs)
  assert np.abs(got - _jax_eps(model, params, inputs)).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
  # (b) kohya's SDXL trainer's names: 'lora_unet_input_blocks_1_0_in_layers_2', ...
  names = lora_formats.ldm_names(lora)
  stem = {lora_formats.kohya_name(p): "lora_unet_" + names[p].replace(".", "_") for p in lora}
  sgm = {stem[k.split(".")[0]] + k[k.index("."):]: v for k, v in kohya.items()}
  assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in sgm)
  save_file(sgm, str(tmp_path / "sdxl_names.safetensors"))
  sgm_lora = lora_lib.load(str(tmp_path / "sdxl_names.safetensors"), params)
  np.testing.assert_allclose(_jax_eps(model, lora_lib.attach(params, sgm_lora), inputs), got,
                             atol=1e-6, rtol=0)
  pipe = diffusers.StableDiffusionXLPipeline
  state_dict, alphas = pipe.lora_state_dict(str(tmp_path), weight_name="sdxl_names.safetensors",
                                            unet_config=unet.config)
  theirs = lora_formats.from_state_dict({k: v.numpy() for k, v in state_dict.items()}, params)
  assert sorted(theirs) == sorted(sgm_lora)  # every module, and (by its values) the same one:
  for path, ab in theirs.items():
    np.testing.assert_array_equal(ab["a"], sgm_lora[path]["a"], err_msg=path)
  fresh = sdxl_fixtures.tiny_torch_unet()
  pipe.load_lora_into_unet(state_dict, alphas, fresh)
  np.testing.assert_allclose(torch_eps(fresh, inputs), want, atol=1e-5, rtol=0)


@pytest.mark.slow  # imports diffusers' pipelines, seconds
def test_sdxl_module_names_are_those_of_diffusers_converter():
  """On SDXL's block structure (3 levels, 2 resnets per down block, 3 per up block, attention in
  the lower two, transformer depth 1 / 2 / 3 here for 1 / 2 / 10) ``ldm_names`` names every
  kernel, and diffusers' converter (``lora_state_dict`` with the UNet config) maps each of those
  kohya names back to the module it came from."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  config = dict(sdxl.TINY_UNET_CONFIG, layers_per_block=2, block_out_channels=(32, 32, 64),
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 2, 3))
  paths = sorted("/".join(k[:-1]) for k in sdxl.param_shapes(sdxl.unet_from_config(config))
                 if k[-1] == "kernel")
  names = lora_formats.ldm_names(paths)
  assert sorted(names) == paths
  assert names["down_blocks_1/attentions_1/proj_in"] == "input_blocks.5.1.proj_in"
  assert names["up_blocks_1/upsamplers_0/conv"] == "output_blocks.5.2.conv"
  state_dict = {}
  for i, path in enumerate(paths):  # module i: down = up = i
    stem = "lora_unet_" + names[path].replace(".", "_")
    state_dict.update({f"{stem}.lora_down.weight": torch.full((1, 1), float(i)),
                       f"{stem}.lora_up.weight": torch.full((1, 1), float(i)),
                       f"{stem}.alpha": torch.tensor(1.0)})
  converted, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(
      state_dict, unet_config=types.SimpleNamespace(layers_per_block=2))
  layout, parts = lora_formats.module_parts({k: v.numpy() for k, v in converted.items()})
  assert layout == "diffusers_old"
  assert {name: int(p["down"][0, 0]) for name, p in parts.items()} == {
      lora_formats.torch_module_name(path): i for i, path in enumerate(paths)}


def test_conv_lora_reads_as_pytorch_conv_delta():
  """A kohya LoRA of a 3x3 convolution named as in the original SDXL UNet: its factors' delta
  [kh, kw, in, out] is PyTorch's W[out, in, kh, kw] = alpha / r * up[:, :, 0, 0] @ down (over
  r), transposed (applied unmerged as a convolution: test_sdxl_unet's unmerged-LoRA test)."""
  rng = np.random.default_rng(0)
  conv, dense = np.zeros((3, 3, 8, 6), np.float32), np.zeros((6, 6), np.float32)
  params = {"down_blocks_0": {"resnets_0": {"conv1": {"kernel": conv}}},
            "down_blocks_1": {"attentions_0": {"proj_in": {"kernel": dense}}}}
  down = rng.normal(size=(2, 8, 3, 3)).astype(np.float32)
  up = rng.normal(size=(6, 2, 1, 1)).astype(np.float32)
  stem = "lora_unet_input_blocks_1_0_in_layers_2"  # = down_blocks.0.resnets.0.conv1
  lora = lora_formats.from_state_dict({f"{stem}.lora_down.weight": down,
                                       f"{stem}.lora_up.weight": up,
                                       f"{stem}.alpha": np.asarray(1.0)}, params)
  assert {p: ab["a"].shape for p, ab in lora.items()} == {
      "down_blocks_0/resnets_0/conv1": (3, 3, 8, 2)}
  want = 0.5 * np.einsum("or,riyx->yxio", up[:, :, 0, 0], down)
  ab = lora["down_blocks_0/resnets_0/conv1"]  # the delta a @ b over r: PyTorch's, transposed
  np.testing.assert_allclose(np.einsum("yxir,ro->yxio", ab["a"], ab["b"]), want, rtol=1e-6,
                             atol=1e-6)
  attached = lora_lib.attach(params, lora, scale=2.0).lora["down_blocks_0"]["resnets_0"]["conv1"]
  np.testing.assert_allclose(attached["b"], 2.0 * ab["b"], rtol=1e-6)  # scale folded into b
  back = lora_formats.to_kohya(lora)  # written back in diffusers' names, alpha / r folded in
  np.testing.assert_array_equal(back["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"],
                                down)
  np.testing.assert_array_equal(back["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"],
                                0.5 * up)
  with pytest.raises(UserError, match=r"lora_up.weight has shape \(6, 2, 3, 3\); allowed"):
    lora_formats.module_parts({f"{stem}.lora_down.weight": down,
                               f"{stem}.lora_up.weight": np.zeros((6, 2, 3, 3))})
  with pytest.raises(UserError, match=r"conv1' has a \(3, 3, 4, 2\) and b \(2, 6\).*"
                                      r"kernel \(3, 3, 8, 6\)"):
    lora_lib.check_fits(params, {"down_blocks_0/resnets_0/conv1": {"a": np.zeros((3, 3, 4, 2)),
                                                                    "b": np.zeros((2, 6))}})


def test_layout_detection_and_errors_name_the_key():
  params = {"down_blocks_1": {"attn1": {"to_q": {"kernel": np.zeros((8, 8))}}}}
  a, b = np.ones((2, 8), np.float32), np.ones((8, 2), np.float32)
  peft = {"unet.down_blocks.1.attn1.to_q.lora_A.weight": a,
          "unet.down_blocks.1.attn1.to_q.lora_B.weight": b,
          "text_encoder.x.lora_A.weight": a}  # text-encoder keys are ignored
  assert lora_formats.detect(peft) == "peft"
  lora = lora_formats.from_state_dict(peft, params)
  np.testing.assert_array_equal(lora["down_blocks_1/attn1/to_q"]["a"], a.T)
  processor = {"down_blocks.1.attn1.processor.to_q_lora.down.weight": a,
               "down_blocks.1.attn1.processor.to_q_lora.up.weight": b}
  assert list(lora_formats.from_state_dict(processor, params)) == ["down_blocks_1/attn1/to_q"]
  kohya = {"lora_unet_down_blocks_1_attn1_to_q.lora_down.weight": a,
           "lora_unet_down_blocks_1_attn1_to_q.lora_up.weight": b,
           "lora_unet_down_blocks_1_attn1_to_q.alpha": np.asarray(1.0)}
  np.testing.assert_allclose(lora_formats.from_state_dict(kohya, params)
                             ["down_blocks_1/attn1/to_q"]["b"], 0.5 * b.T)  # alpha / r
  with pytest.raises(UserError, match="'input_blocks_4_1_proj_in' .kohya layout. is not a Dense"):
    lora_formats.from_state_dict({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": a,
                                  "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": b}, params)
  with pytest.raises(UserError, match="'unet.x.weird' fits none of the layouts"):
    lora_formats.detect({"unet.x.weird": a})
  with pytest.raises(UserError, match="lacks its up"):
    lora_formats.from_state_dict({"unet.down_blocks.1.attn1.to_q.lora_A.weight": a}, params)
