"""Memory plan for MLCM on SDXL at 1024x1024: XLA's memory analysis of the compiled, sharded
MLCD train step, without allocating anything (abstract parameters, AOT lower + compile).

XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/mlcm_memory.py \\
    [--devices 8] [--batch 24] [--latent 128] [--image_free sdi|mdi|bank] [--dtype bfloat16]

Prints one JSON line: parameter counts and the bytes of frozen UNet / LoRA / Adam state per
device under the data x fsdp mesh rules (FSDP over all devices), exact from the shardings; with
``--compile`` also XLA's per-device temp / argument / output sizes of the compiled step (run it
on the GPU host: XLA:CPU did not finish compiling the SDXL step in 15 minutes on 2 cores).
"""
import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs
from configs import sdxl_mlcm  # pylint: disable=g-import-not-at-top
from mcm_jax import errors, lora as lora_lib, objectives, sharding, train
from mcm_jax.models import sdxl

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields the Flax UNet reads).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


def nbytes(tree):
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def per_device_bytes(tree, shardings):
  total = 0
  for x, sh in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    shard = sh.shard_shape(x.shape)
    total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
  return total


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=errors.positive_int, default=8)
  p.add_argument("--batch", type=errors.positive_int, default=24)
  p.add_argument("--latent", type=errors.positive_int, default=128)
  p.add_argument("--image_free", default="sdi", choices=["sdi", "mdi", "bank"])
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--rank", type=errors.positive_int, default=64)
  p.add_argument("--compile", action="store_true",
                 help="also AOT-compile the sharded step for XLA's memory analysis (minutes on "
                      "a GPU host; more than 15 min for SDXL on 8 fake CPU devices)")
  args = p.parse_args()

  config = sdxl_mlcm.get_config("sdxl")
  config.latent_resolution = args.latent
  config.train.batch_size = args.batch
  config.mlcm.image_free = "sdi" if args.image_free == "bank" else args.image_free
  model = sdxl.unet_from_config(SDXL_UNET, jnp.dtype(args.dtype))
  params = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
  lora = jax.eval_shape(functools.partial(lora_lib.init_lora, rank=args.rank,
                                          rng=jax.random.PRNGKey(0)), params)
  tx = train.make_optimizer(ml_collections.ConfigDict(config.train.optim))
  state = jax.eval_shape(lambda l: train.init_state(l, tx, 0), lora)
  mesh = sharding.make_mesh(data=1, fsdp=args.devices, devices=jax.devices()[:args.devices])
  b, res = args.batch, args.latent
  cond = {"context": jax.ShapeDtypeStruct((b, 77, 2048), jnp.float32),
          "text_embeds": jax.ShapeDtypeStruct((b, 1280), jnp.float32),
          "time_ids": jax.ShapeDtypeStruct((b, 6), jnp.float32)}
  batch = dict(cond)
  if args.image_free == "bank":
    z = jax.ShapeDtypeStruct((b, res, res, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.int32)
    batch.update(z_tm=z, z_tn=z, t_m=t, t_n=t, seg_start=t)
  frozen = {"unet": params, "uncond": jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), cond)}
  loss = objectives.mlcm_loss(config, sdxl.make_denoiser(model), 0)
  step = train.make_multi_step(train.make_train_step(loss, tx, 0.0), None, None, 1, mesh)
  state_sh = sharding.tree_shardings(state, mesh)
  frozen_sh = sharding.tree_shardings(frozen, mesh)
  batch_sh = jax.tree_util.tree_map(lambda _: sharding.stacked_batch_sharding(mesh), batch)
  stacked = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype),
                                   batch)
  gib = 2 ** 30
  xla = {}
  if args.compile:
    t0 = time.time()
    compiled = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh)).lower(
        state, frozen, stacked).compile()
    mem = compiled.memory_analysis()
    xla = {"xla_argument_gib": round(mem.argument_size_in_bytes / gib, 3),
           "xla_output_gib": round(mem.output_size_in_bytes / gib, 3),
           "xla_temp_gib": round(mem.temp_size_in_bytes / gib, 3),
           "compile_seconds": round(time.time() - t0, 1)}
  print(json.dumps({
      "bench": "mlcm_memory", "machine": platform.node(), "backend": jax.default_backend(),
      "devices": args.devices, "global_batch": b, "latent": res, "pixels": res * 8,
      "image_free": args.image_free, "compute_dtype": args.dtype, "lora_rank": args.rank,
      "unet_params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)),
      "lora_params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora)),
      "frozen_unet_gib_total": round(nbytes(params) / gib, 2),
      "frozen_gib_per_device": round(per_device_bytes(frozen, frozen_sh) / gib, 3),
      "train_state_gib_per_device": round(per_device_bytes(state, state_sh) / gib, 3),
      **xla}))


if __name__ == "__main__":
  main()
