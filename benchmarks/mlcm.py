"""MLCM train-step cost on a tiny SDXL-architecture UNet (CPU), or SDXL's own, JAX vs diffusers
PyTorch.

python benchmarks/mlcm.py [--batch 8] [--latent 16] [--rank 4] [--no_torch]
python benchmarks/mlcm.py --sdxl DIR --batch 1 --latent 32 --rank 64 --repeats 1   # full size

JAX: the step that training runs (``sdxl_mlcm.abstract_step`` of ``configs/sdxl_mlcm.py:tiny``
at this batch, latent size and LoRA rank; K = 8, k = 20; stage 0 reading its pairs
``z_{t_m}, z_{t_n}`` from a trajectory bank, so the step is the student's: its target forward at
``z_{t_n}``, its forward + backward at ``z_{t_m}``, Adam) / (those parts timed alone: one student
forward, one forward + backward) -- ideal 1.0. PyTorch: the same step with diffusers'
UNet2DConditionModel + a peft LoRA on the same config, shapes and pairs, on the same CPU; the
side-by-side figure is PyTorch step time / JAX step time (measured in one run).
``--sdxl DIR``: the UNet of an SDXL directory in float32 (e.g. benchmarks/make_random_sdxl.py's),
prompt embeddings random at CLIP's 77 tokens; PyTorch runs first, in a child process, so the two
UNets are never in memory together. Prints one JSON line.
"""
import argparse
import json
import multiprocessing
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs
from configs import sdxl_mlcm as sdxl_mlcm_config  # pylint: disable=g-import-not-at-top
from mcm_jax import cli, mlcm, objectives, schedules, train
from mcm_jax.experiments import sdxl_mlcm
from mcm_jax.models import sdxl, sdxl_text


def timeit(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def tiny_config(batch, latent, rank, sdxl_dir=""):
  """``configs/sdxl_mlcm.py:tiny`` at this size, stage 0 from a trajectory bank (K = 8); with
  ``sdxl_dir``, its UNet in float32."""
  c = sdxl_mlcm_config.get_config("tiny")
  c.update_from_flattened_dict({"train.batch_size": batch, "latent_resolution": latent,
                                "lora.rank": rank, "mlcm.num_segments": 8,
                                "mlcm.bank.dir": "unused: the pairs are made here",
                                "student_unet": sdxl_dir})
  return c


def inputs(c):
  """(Step with real weights, one batch of random conditioning and a pair at K = 8)."""
  model, params, _, encode = sdxl_mlcm.build_models(c)
  if c.student_unet:  # random embeddings at CLIP's length instead of the hashed stand-in's
    encode = sdxl_text.zeros_text_encoder(model)
  encode_batch = sdxl_mlcm.conditioning_fn(c, encode)
  frozen = sdxl_mlcm.frozen_inputs(c, params, None, sdxl_mlcm.unconditional(c, encode_batch))
  trained = sdxl_mlcm.step(c, 0, sdxl.make_denoiser(model), params, frozen,
                           sdxl_mlcm.init_lora(c, params), encode_batch)
  batch = make_batch(c, encode_batch)
  assert jax.tree_util.tree_map(jnp.shape, batch) == jax.tree_util.tree_map(
      lambda x: x.shape, trained.batch)
  return trained, batch


def make_batch(c, encode_batch):
  """One batch: random conditioning of ``encode_batch``'s shapes, SDXL's size conditioning and a
  pair (z_tm, z_tn nearby) at K = 8; the same for every call with the same config."""
  rng = np.random.default_rng(0)
  shapes = encode_batch([""] * c.train.batch_size)
  batch = {k: jnp.asarray(rng.normal(size=shapes[k].shape), jnp.float32)
           for k in ("context", "text_embeds")}
  batch["time_ids"] = sdxl.time_ids(c.latent_resolution * 8, c.train.batch_size)
  b, res = c.train.batch_size, c.latent_resolution
  identity = lambda z, t: z
  pair = mlcm.training_pair(jax.random.PRNGKey(2), (b, res, res, 4),
                            objectives.mlcm_hparams(c, 0), identity, identity)
  pair["z_tn"] = pair["z_tm"] + 0.1 * jax.random.normal(jax.random.PRNGKey(3), pair["z_tm"].shape)
  batch.update({k: pair[k] for k in ("z_tm", "z_tn", "t_m", "t_n", "seg_start")})
  return batch


def full_size_batch(c):
  """``make_batch`` for an SDXL directory's UNet without loading its weights."""
  config = sdxl.read_json(os.path.join(sdxl.component_dir(c.student_unet, "unet"), "config.json"))
  model = sdxl.unet_from_config(config)
  return make_batch(c, sdxl_mlcm.conditioning_fn(c, sdxl_text.zeros_text_encoder(model)))


def jax_figures(c, trained, batch, repeats):
  tx = train.make_optimizer(c.train.optim)
  step = train.jit_step(trained.loss, tx, c.train, None, trained.frozen)
  state = [train.init_state(trained.params, tx, c.train.seed)]
  batches = jax.tree_util.tree_map(lambda x: x[None], batch)

  def run_step():
    state[0], *_ = step(state[0], trained.frozen, batches)
    return state[0]

  step_s = timeit(lambda: jax.block_until_ready(run_step()), repeats)
  forward = jax.jit(trained.forward)
  fwd_s = timeit(lambda: jax.block_until_ready(forward(trained.params, trained.frozen, batch)),
                 repeats)
  fwd_bwd = jax.jit(jax.grad(lambda p, f, b: jnp.mean(trained.forward(p, f, b) ** 2)))
  bwd_s = timeit(lambda: jax.block_until_ready(fwd_bwd(trained.params, trained.frozen, batch)),
                 repeats)
  return dict(jax_step_s=step_s, jax_student_fwd_s=fwd_s, jax_student_fwd_bwd_s=bwd_s,
              jax_step_over_parts=step_s / (fwd_s + bwd_s))


def torch_figures(c, batch, repeats):
  """The same step (eq. 7, the pair given) with diffusers' UNet and a peft LoRA (rank
  ``lora.rank`` on the same projections), the same shapes and pair values."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from peft import LoraConfig  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if c.student_unet:
    fp16 = os.path.join(c.student_unet, "unet", "diffusion_pytorch_model.fp16.safetensors")
    unet = UNet2DConditionModel.from_pretrained(
        c.student_unet, subfolder="unet", variant="fp16" if os.path.isfile(fp16) else None,
        torch_dtype=torch.float32)
  else:
    unet = UNet2DConditionModel(**sdxl.TINY_UNET_CONFIG)
  unet.requires_grad_(False)
  rank = c.lora.rank
  unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
  opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad],
                         lr=c.train.optim.learning_rate)
  alphas, sigmas = (torch.from_numpy(np.array(a)) for a in schedules.sdxl_alphas_sigmas())
  host = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
  nchw = lambda z: z.permute(0, 3, 1, 2).contiguous()
  z_tm, z_tn = nchw(host["z_tm"]), nchw(host["z_tn"])
  t_m, t_n, start = host["t_m"].long(), host["t_n"].long(), host["seg_start"].long()
  cond = dict(encoder_hidden_states=host["context"],
              added_cond_kwargs={"text_embeds": host["text_embeds"],
                                 "time_ids": host["time_ids"]})

  def ddim(z, eps, t, s):
    a_t, s_t = alphas[t].view(-1, 1, 1, 1), sigmas[t].view(-1, 1, 1, 1)
    a_s, s_s = alphas[s].view(-1, 1, 1, 1), sigmas[s].view(-1, 1, 1, 1)
    return a_s * (z - s_t * eps) / a_t + s_s * eps

  def step():
    with torch.no_grad():
      target = ddim(z_tn, unet(z_tn, t_n, **cond).sample, t_n, start)
    pred = ddim(z_tm, unet(z_tm, t_m, **cond).sample, t_m, start)
    loss = torch.mean((pred - target) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()

  return dict(torch_step_s=timeit(step, repeats), torch_threads=torch.get_num_threads())


def _torch_child(c, batch, repeats, queue):
  queue.put(torch_figures(c, batch, repeats))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=cli.positive_int, default=8)
  p.add_argument("--latent", type=cli.positive_int, default=16)
  p.add_argument("--rank", type=cli.positive_int, default=4)
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--sdxl", default="", help="an SDXL directory: its UNet instead of the tiny one")
  p.add_argument("--repeats", type=cli.positive_int, default=5,
                 help="timed calls after a warm-up; the median is reported")
  args = p.parse_args()
  out = dict(bench="mlcm_step", machine=platform.node(), processor=platform.processor(),
             backend=jax.default_backend(), batch=args.batch, latent=args.latent,
             rank=args.rank, unet=args.sdxl or "TINY_UNET_CONFIG",
             step="sdxl_mlcm stage 0 from a bank", repeats=args.repeats)
  c = tiny_config(args.batch, args.latent, args.rank, args.sdxl)
  if args.sdxl and not args.no_torch:  # PyTorch first, alone in memory
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    host = {k: np.asarray(v) for k, v in full_size_batch(c).items()}
    child = ctx.Process(target=_torch_child, args=(c, host, args.repeats, queue))
    child.start()
    out.update(queue.get())
    child.join()
  trained, batch = inputs(c)
  out.update(jax_figures(c, trained, batch, args.repeats))
  if not args.no_torch:
    if not args.sdxl:
      out.update(torch_figures(c, batch, args.repeats))
    out["torch_over_jax_step"] = out["torch_step_s"] / out["jax_step_s"]
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
  main()
