"""SDXL's ControlNet: diffusers' PyTorch ``ControlNetModel`` files load into the scanned Flax
ControlNet, which computes PyTorch's residuals (RGB and BGR, pooled or not); the UNet with them
is PyTorch's UNet with ``down_block_additional_residuals``; ``generate_images`` with a ControlNet
equals diffusers' ``StableDiffusionXLControlNetPipeline``; unfitting ControlNets and control
images are errors naming them."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdxl_fixtures  # tests/: torch is imported inside its functions
from mcm_jax import errors, pipeline
from mcm_jax.models import sdxl, sdxl_controlnet

pytestmark = pytest.mark.slow  # PyTorch and JAX models of the tiny SDXL, seconds each

PROMPTS = ["lower newer", "wider lowest"]


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _inputs(rng, batch=2, latent=8):
  """Random UNet / ControlNet inputs of the tiny SDXL (NCHW), numpy."""
  return dict(sample=rng.standard_normal((batch, 4, latent, latent), np.float32),
              t=np.array([999.0, 251.0][:batch], np.float32),
              context=rng.standard_normal((batch, 5, 32), np.float32),
              text_embeds=rng.standard_normal((batch, 32), np.float32),
              time_ids=np.tile(np.float32([[16, 16, 0, 0, 16, 16]]), (batch, 1)),
              control=rng.uniform(0, 1, (batch, 3, 2 * latent, 2 * latent)).astype(np.float32))


def test_controlnet_and_controlled_unet_equal_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  torch_unet = sdxl_fixtures.tiny_torch_unet()
  unet_dir = tmp_path / "unet"
  torch_unet.save_pretrained(unet_dir)
  unet, unet_params = sdxl.load_unet(str(unet_dir))
  x = _inputs(np.random.default_rng(0))
  t = {k: torch.from_numpy(v) for k, v in x.items()}
  added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
  for variant in ({}, {"controlnet_conditioning_channel_order": "bgr",
                       "global_pool_conditions": True}):
    torch_net = sdxl_fixtures.tiny_torch_controlnet(torch_unet, seed=1, **variant)
    net_dir = tmp_path / f"controlnet{len(variant)}"
    torch_net.save_pretrained(net_dir)
    net, net_params = sdxl.load_controlnet(str(net_dir), unet)
    down, mid = net.apply({"params": net_params}, x["sample"], x["t"], x["context"], added,
                          x["control"], 0.7)
    with torch.no_grad():
      theirs = torch_net(t["sample"], t["t"], t["context"], t["control"],
                         conditioning_scale=0.7, added_cond_kwargs={
                             "text_embeds": t["text_embeds"], "time_ids": t["time_ids"]})
      eps_theirs = torch_unet(
          t["sample"], t["t"], t["context"], added_cond_kwargs={
              "text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
          down_block_additional_residuals=theirs.down_block_res_samples,
          mid_block_additional_residual=theirs.mid_block_res_sample).sample.numpy()
    assert len(down) == len(theirs.down_block_res_samples) == 4  # conv_in's, level 0's 2, level 1's
    for ours_i, theirs_i in zip([*down, mid], [*theirs.down_block_res_samples,
                                               theirs.mid_block_res_sample]):
      assert ours_i.shape == tuple(theirs_i.shape)
      assert _rel(ours_i, theirs_i.numpy()) < 1e-4
    # The UNet with the ControlNet attached (what generation runs): PyTorch's UNet with the
    # residuals, and not the UNet without them.
    eps = sdxl.make_eps_fn(unet, net)
    cond = {"context": x["context"], "control": x["control"].transpose(0, 2, 3, 1),
            "control_scale": np.full((2,), 0.7, np.float32), **added}
    ours = np.asarray(eps(sdxl_controlnet.Controlled(unet_params, net_params),
                          x["sample"].transpose(0, 2, 3, 1), x["t"], cond)).transpose(0, 3, 1, 2)
    assert _rel(ours, eps_theirs) < 1e-4
    plain = np.asarray(sdxl.make_eps_fn(unet)(unet_params, x["sample"].transpose(0, 2, 3, 1),
                                              x["t"], cond)).transpose(0, 3, 1, 2)
    assert _rel(plain, eps_theirs) > 1e-2
  # A ControlNet's random init has its shapes (what the loader checks the files against).
  shapes = jax.eval_shape(net.init_weights, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_map(jnp.shape, shapes) == jax.tree_util.tree_map(jnp.shape,
                                                                             net_params)


def test_generate_with_controlnet_equals_diffusers_pipeline(tiny_sdxl_dir, tmp_path):
  """Guided (w = 4, zero negative embeddings), 3 Euler steps on the 'leading' grid,
  conditioning scale 0.8: the images are diffusers' StableDiffusionXLControlNetPipeline's from
  the same noise; the ControlNet changes them; unfitting inputs are errors."""
  torch = pytest.importorskip("torch")
  import diffusers  # pylint: disable=g-import-not-at-top
  reference = sdxl_fixtures.diffusers_sdxl_pipeline(tiny_sdxl_dir)
  torch_net = sdxl_fixtures.tiny_torch_controlnet(reference.unet, seed=2)
  net_dir = tmp_path / "controlnet"
  torch_net.save_pretrained(net_dir)
  controlled = diffusers.StableDiffusionXLControlNetPipeline(**reference.components,
                                                             controlnet=torch_net)
  x = np.linspace(-1, 1, 32)
  control = np.stack([np.sin(4 * x)[:, None] * np.cos(3 * x)[None, :], np.outer(x, x),
                      np.cos(5 * x)[:, None] + 0 * x], -1).astype(np.float32)
  noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0),
                                       (2, 16, 16, 4)))
  with torch.no_grad():
    image = torch.from_numpy((control.transpose(2, 0, 1) + 1) / 2)[None]
    theirs = controlled(prompt=PROMPTS, image=image,
                        num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
                        controlnet_conditioning_scale=0.8,
                        latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                        output_type="np").images
  models = pipeline.load_pipeline(tiny_sdxl_dir, controlnet_dir=str(net_dir))
  ours = pipeline.generate_images(models, PROMPTS, 3, resolution=32, batch_size=2,
                                  timesteps="leading", guidance_scale=4.0, control_images=control,
                                  controlnet_scale=0.8)
  np.testing.assert_allclose((ours + 1) / 2, theirs, atol=1e-4)
  weaker = pipeline.generate_images(models, PROMPTS, 3, resolution=32, batch_size=2,
                                    timesteps="leading", guidance_scale=4.0,
                                    control_images=control, controlnet_scale=0.0)
  assert np.abs(weaker - ours).mean() > 1e-3  # the ControlNet acts, in proportion to its scale

  with pytest.raises(errors.UserError, match=r"control images of shape \(2, 16, 16, 3\)"):
    pipeline.generate_images(models, PROMPTS, 3, resolution=32, timesteps="leading",
                             control_images=control[::2, ::2])
  with pytest.raises(errors.UserError, match="this pipeline has a ControlNet"):
    pipeline.generate_images(models, PROMPTS, 3, resolution=32)
  other = tmp_path / "other"
  shutil.copytree(net_dir, other)
  config = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps(dict(config, block_out_channels=[32, 32])))
  with pytest.raises(errors.UserError, match=(
      f"{os.path.join(other, 'config.json')}: not an SDXL controlnet config .*another "
      r"architecture: block_out_channels=\(32, 32\), the UNet's is \(32, 64\)")):
    pipeline.load_pipeline(tiny_sdxl_dir, controlnet_dir=str(other))
