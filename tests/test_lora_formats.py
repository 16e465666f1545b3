"""LoRA layouts users meet (PEFT, diffusers' older layout, kohya for ComfyUI / A1111 / kohya),
proven with diffusers' own converter and PyTorch UNet on the tiny SDXL-architecture UNet."""
import jax
import numpy as np
import pytest

import sdxl_fixtures  # tests/: torch is imported inside its functions
from mcm_jax import lora as lora_lib
from mcm_jax import lora_formats
from mcm_jax.errors import UserError
from mcm_jax.models import sdxl
from test_sdxl import tiny_inputs, torch_eps  # pylint: disable=g-bad-import-order

TARGETS_TORCH = ["to_q", "to_k", "to_v", "to_out.0"]


def _random_lora(params, rank=4, seed=1):
  lora = lora_lib.init_lora(params, rank=rank, rng=jax.random.PRNGKey(seed))
  return {p: {"a": ab["a"], "b": 0.1 * jax.random.normal(jax.random.PRNGKey(i), ab["b"].shape)}
          for i, (p, ab) in enumerate(sorted(lora.items()))}


def _jax_eps(model, params, inputs):
  eps = jax.jit(sdxl.make_eps_fn(model))
  return np.asarray(eps(params, inputs["z"], inputs["t"], inputs["cond"]))


@pytest.mark.slow  # PyTorch equivalence, seconds
def test_kohya_export_is_diffusers_converter_output_and_loads_in_pytorch(tiny_sdxl_dir,
                                                                          tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model, params = sdxl.load_unet(tiny_sdxl_dir)
  lora, scale = _random_lora(params), 0.7
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
  got = _jax_eps(model, lora_lib.merge(params, lora, scale), inputs)
  assert np.abs(got - _jax_eps(model, params, inputs)).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(got, torch_eps(unet, inputs), atol=2e-4, rtol=0)
  # Reading it back (alpha / r folded in) gives the same merged UNet.
  back = lora_formats.from_state_dict(kohya, params)
  np.testing.assert_allclose(_jax_eps(model, lora_lib.merge(params, back), inputs), got,
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
    np.testing.assert_allclose(_jax_eps(model, lora_lib.merge(params, lora), inputs), want,
                               atol=2e-4, rtol=0, err_msg=layout)


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
