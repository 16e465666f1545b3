"""MLCD train-step cost on a tiny SDXL-architecture UNet (CPU), JAX vs diffusers PyTorch.

python benchmarks/mlcm.py [--batch 8] [--latent 16] [--rank 4] [--no_torch]

JAX: the LoRA train step (guided teacher step at z_tm, student target at z_tn, student fwd+bwd
at z_tm, Adam) / (its parts timed alone: guided teacher forward on the 2B cond+uncond batch,
student forward, student forward+backward) -- ideal 1.0. PyTorch: the same step with diffusers'
UNet2DConditionModel + a peft LoRA on the same config, batch and resolution, on the same CPU;
the side-by-side figure is PyTorch step time / JAX step time (measured in one run).
Prints one JSON line.
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mcm_jax import lora as lora_lib
from mcm_jax import cli, mlcm, train
from mcm_jax.models import sdxl


def timeit(fn, repeats=5):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def jax_figures(batch, latent, rank):
  model = sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG)
  params = model.init_weights(jax.random.PRNGKey(0))
  denoise = sdxl.make_denoiser(model)
  lora = lora_lib.init_lora(params, rank, jax.random.PRNGKey(1))
  tx = train.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999, weight_decay=0.0)))
  rng = np.random.default_rng(0)
  cond = {"context": jnp.asarray(rng.normal(size=(batch, 8, 32)), jnp.float32),
          "text_embeds": jnp.asarray(rng.normal(size=(batch, 32)), jnp.float32),
          "time_ids": jnp.tile(jnp.array([[128., 128, 0, 0, 128, 128]]), (batch, 1))}
  uncond = jax.tree_util.tree_map(jnp.zeros_like, cond)
  z_tm = jnp.asarray(rng.normal(size=(batch, latent, latent, 4)), jnp.float32)
  s, t_m, t_n, start = mlcm.sample_times(jax.random.PRNGKey(2), batch, 8, 20)

  def loss(lr, batch_, rng_, step, frozen):
    del batch_, rng_, step
    student_params = lora_lib.attach(frozen, lr)
    student = lambda z, t: denoise(student_params, z, t, cond)
    guided = mlcm.guided_denoiser(denoise, frozen, cond, uncond, 8.0)
    per_example, _ = mlcm.mlcd_loss(student, guided, z_tm, t_m, t_n, start)
    return jnp.mean(per_example), {}

  step = jax.jit(train.make_train_step(loss, tx, 0.0))
  state = train.init_state(lora, tx, 0)
  step_s = timeit(lambda: jax.block_until_ready(step(state, None, params)))
  teacher = jax.jit(lambda p, z: mlcm.guided_denoiser(denoise, p, cond, uncond, 8.0)(z, t_m))
  teacher_s = timeit(lambda: jax.block_until_ready(teacher(params, z_tm)))
  student_fwd = jax.jit(lambda lr, p, z: denoise(lora_lib.attach(p, lr), z, t_n, cond))
  fwd_s = timeit(lambda: jax.block_until_ready(student_fwd(lora, params, z_tm)))
  student_bwd = jax.jit(jax.grad(lambda lr, p, z: jnp.mean(
      denoise(lora_lib.attach(p, lr), z, t_m, cond) ** 2)))
  bwd_s = timeit(lambda: jax.block_until_ready(student_bwd(lora, params, z_tm)))
  return dict(jax_step_s=step_s, jax_teacher_guided_s=teacher_s, jax_student_fwd_s=fwd_s,
              jax_student_fwd_bwd_s=bwd_s,
              jax_step_over_parts=step_s / (teacher_s + fwd_s + bwd_s))


def torch_figures(batch, latent, rank):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from peft import LoraConfig  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**sdxl.TINY_UNET_CONFIG)
  unet.requires_grad_(False)
  unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
  opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
  alphas, sigmas = (torch.from_numpy(np.array(a)) for a in sdxl_alphas())
  g = torch.Generator().manual_seed(0)
  cond = dict(encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
              added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g),
                                 "time_ids": torch.tensor([[128., 128, 0, 0, 128, 128]] * batch)})
  z_tm = torch.randn(batch, 4, latent, latent, generator=g)
  t_m = torch.randint(21, 999, (batch,), generator=g)
  start = (t_m // 125) * 125  # K = 8 segments
  t_n = torch.maximum(t_m - 20, start)

  def ddim(z, eps, t, s):
    a_t, s_t = alphas[t].view(-1, 1, 1, 1), sigmas[t].view(-1, 1, 1, 1)
    a_s, s_s = alphas[s].view(-1, 1, 1, 1), sigmas[s].view(-1, 1, 1, 1)
    return a_s * (z - s_t * eps) / a_t + s_s * eps

  def step():
    with torch.no_grad():
      unet.disable_adapters()  # the teacher is the base UNet
      both = unet(torch.cat([z_tm, z_tm]), torch.cat([t_m, t_m]),
                  encoder_hidden_states=torch.cat([cond["encoder_hidden_states"],
                                                   0 * cond["encoder_hidden_states"]]),
                  added_cond_kwargs={k: torch.cat([v, v]) for k, v in
                                     cond["added_cond_kwargs"].items()}).sample
      unet.enable_adapters()
      e_c, e_u = both.chunk(2)
      z_tn = ddim(z_tm, e_u + 8.0 * (e_c - e_u), t_m, t_n)
      target = ddim(z_tn, unet(z_tn, t_n, **cond).sample, t_n, start)
    pred = ddim(z_tm, unet(z_tm, t_m, **cond).sample, t_m, start)
    loss = torch.mean((pred - target) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()

  return dict(torch_step_s=timeit(step), torch_threads=torch.get_num_threads())


def sdxl_alphas():
  from mcm_jax import schedules  # pylint: disable=g-import-not-at-top
  return schedules.sdxl_alphas_sigmas()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=cli.positive_int, default=8)
  p.add_argument("--latent", type=cli.positive_int, default=16)
  p.add_argument("--rank", type=cli.positive_int, default=4)
  p.add_argument("--no_torch", action="store_true")
  args = p.parse_args()
  out = dict(bench="mlcm_step", machine=platform.node(), processor=platform.processor(),
             backend=jax.default_backend(), batch=args.batch, latent=args.latent,
             rank=args.rank, unet="TINY_UNET_CONFIG")
  out.update(jax_figures(args.batch, args.latent, args.rank))
  if not args.no_torch:
    out.update(torch_figures(args.batch, args.latent, args.rank))
    out["torch_over_jax_step"] = out["torch_step_s"] / out["jax_step_s"]
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
  main()
