"""Text-to-image on SDXL from the command line: few-step with an MLCM LoRA,

  python -m mcm_jax.generate --sdxl=/models/sdxl-base --lora=runs/mlcm/stage2/lora \\
      --prompt="a red fox in snow" --steps=4 --out=samples/

or the guided teacher (no LoRA; diffusers' default SDXL sampler, Euler on the 'leading' grid):

  python -m mcm_jax.generate --sdxl=/models/sdxl-base --prompt="a red fox in snow" \\
      --steps=25 --timesteps=leading --guidance_scale=8 --negative_prompt="blurry" --out=teacher/

or image-to-image (``--init_image=photo.png --strength=0.5``), or with an SDXL ControlNet
(``--controlnet=/models/controlnet-canny-sdxl-1.0 --control_image=edges.png``, the control image
at --resolution). ``--print_schedule`` prints the
timesteps and sigmas (for ComfyUI / diffusers) and exits. ``--prompts=FILE`` (.txt / .jsonl /
.parquet) instead of ``--prompt``. The library behind it is ``mcm_jax.pipeline`` (one
``jax.jit`` per steps / timesteps / sampler / strength, compiled once). Writes one PNG per
prompt, ``grid.png`` and ``schedule.txt``; with several step counts (``--steps=2,4,8``) those
go to ``OUT/steps_<k>/`` and ``OUT/grid.png`` shows the step counts side by side. Bad input
(flags, paths, a corrupt or unfitting file) ends in one message and exit code 2
(``mcm_jax/cli.py``); ``--debug`` shows the traceback.
"""
import os
import re

import numpy as np
from absl import flags, logging

from mcm_jax import cli, errors, hub, pipeline, plotting, storage
from mcm_jax.data import prompts as prompt_data
from mcm_jax.samplers import discrete


def schedule_text(steps, timesteps, sampler, strength=1.0):
  """The chosen sampler's timesteps and sigmas (image-to-image: the ``strength`` part), and how
  ComfyUI and diffusers reproduce it."""
  full = grid = discrete.sampling_grid(steps, timesteps)
  if strength != 1.0:
    grid = pipeline.strength_grid(full, strength)
  listed = lambda values, fmt: ", ".join(fmt.format(v) for v in values)
  sigmas = listed(discrete.grid_sigmas(grid), "{:.6f}")
  hf_grid, hf_arg = full, ("pipeline argument 'timesteps'"
                            + (f", strength={strength}" if strength != 1.0 else ""))
  if sampler == "dpmpp_2s":  # its grid holds the midpoints, which diffusers' strength would cut
    hf_grid = discrete.with_midpoints(grid)
    if strength != 1.0:
      hf_arg = "the steps from the noised init latents; diffusers' strength cuts another list"
  if sampler == "ddim":
    comfy = ("SamplerCustom with sampler 'euler' (DDIM jumps are Euler steps in these sigmas) "
             "and a ManualSigmas node holding the sigmas")
    hf = "EulerDiscreteScheduler"
  elif sampler == "dpmpp_2m":
    comfy = ("SamplerCustom with sampler 'dpmpp_2m' and a ManualSigmas node holding the sigmas")
    hf = "DPMSolverMultistepScheduler"
  elif sampler == "dpmpp_2s":
    comfy = ("no core sampler (its 'dpmpp_2s_ancestral' at eta 0 takes the midpoint in "
             "log-sigma, not at the timestep midway)")
    hf = "DPMSolverSinglestepScheduler (dpmsolver++, solver_order 2)"
  elif sampler == "tcd":
    comfy = ("no core sampler: the ComfyUI-TCD custom node's TCD sampler (its gamma = "
             "--gamma) with the sigmas above")
    hf = "TCDScheduler (eta = --gamma)"
  else:
    comfy = ("SamplerCustom with sampler 'lcm', a ModelSamplingDiscrete node set to 'lcm' (LCM's "
             "boundary condition) and a ManualSigmas node holding the sigmas")
    hf = "LCMScheduler"
  return (f"steps: {steps}  timesteps: {timesteps}  sampler: {sampler}  strength: {strength}\n"
          f"timesteps (the UNet's t at each step): {listed(grid[:-1], '{}')}\n"
          f"sigmas (sigma_t / alpha_t at each step, then 0): {sigmas}\n"
          f"ComfyUI: {comfy}.\n"
          f"diffusers: {hf} with timesteps=[{listed(hf_grid[:-1], '{}')}] ({hf_arg}).\n")


def parse_scales(values):
  """``--lora_scale`` (strings) -> finite floats; UserError naming the value otherwise."""
  text = ",".join(values)
  try:
    scales = [float(v) for v in values]
  except ValueError:
    scales = [float("nan")]
  if not scales or not np.all(np.isfinite(scales)):
    raise errors.UserError(f"--lora_scale={text} is invalid; allowed: a finite number, or one "
                           "per --lora file (comma-separated)")
  return scales


def parse_steps(values):
  """``--steps`` (a list of strings) -> ints; UserError naming the value and what is allowed."""
  allowed = "comma-separated integers in 1..1000, e.g. --steps=1,2,4,8"
  text = ",".join(values)
  if not values:
    raise errors.UserError(f"--steps={text!r} is empty; allowed: {allowed}")
  for s in values:
    if not s.strip().isdigit() or not 1 <= int(s) <= 1000:
      raise errors.UserError(f"--steps={text}: {s!r} is invalid; allowed: {allowed}")
  return [int(s) for s in values]


def _slug(text, n=40):
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


FLAGS = flags.FLAGS


def define_pipeline_flags(out_default, flag_values=FLAGS):
  """The flags ``generate`` and ``t2i_eval`` share (defined only when run as a program, so the
  modules import cleanly beside other flag-defining modules)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("sdxl", None, "Local diffusers-layout SDXL directory (unet/, vae/, "
                      "text_encoder(_2)/, tokenizer(_2)/).", **fv)
  flags.DEFINE_string("lora", "", "MLCM LoRA: a .safetensors file or a directory holding "
                      "pytorch_lora_weights.safetensors ('' = the base model); several, "
                      "comma-separated, are stacked (e.g. the MLCM LoRA and a style LoRA).", **fv)
  flags.DEFINE_string("prompts", None, "A prompt file (.txt / .jsonl / .parquet).", **fv)
  flags.DEFINE_integer("resolution", 1024, "Image size in pixels (a multiple of 32 for SDXL).",
                       lower_bound=1, **fv)
  flags.DEFINE_integer("batch_size", 4, "Images per jitted call.", lower_bound=1, **fv)
  flags.DEFINE_integer("seed", 0, "Noise seed.", **fv)
  flags.DEFINE_string("out", out_default, "Output directory.", **fv)


def check_pipeline_flags(flag_values, required):
  """UserError unless each flag of ``required`` is set and --sdxl / --out are usable; returns
  --sdxl as a local directory (a hub name such as stabilityai/stable-diffusion-xl-base-1.0 is
  resolved from the local Hugging Face cache, ``mcm_jax.hub``)."""
  cli.require_flags(flag_values, required)
  sdxl_dir = hub.local_path(flag_values.sdxl, "--sdxl")
  if storage.exists(flag_values.out) and not storage.isdir(flag_values.out):
    raise errors.UserError(f"--out={flag_values.out!r} is a file; allowed: a directory (created "
                           "if missing)")
  return sdxl_dir


def define_flags(flag_values=FLAGS):
  define_pipeline_flags("samples", flag_values)
  flags.DEFINE_string("unet", "", "A diffusers UNet directory (config.json and diffusion_pytorch_"
                      "model[.fp16].safetensors) used instead of --sdxl's UNet, e.g. a full-UNet "
                      "student exported by mcm_jax.main (stage<i>/unet).", flag_values=flag_values)
  flags.DEFINE_list("lora_scale", ["1.0"], "LoRA scale, or one per --lora file "
                    "(comma-separated).", flag_values=flag_values)
  flags.DEFINE_string("prompt", None, "One prompt (or --prompts).", flag_values=flag_values)
  flags.DEFINE_list("steps", ["4"], "Sampling steps (the number of MLCM segments, 1-8; e.g. 25 "
                    "for the guided teacher); several, comma-separated (e.g. 1,2,4,8), each into "
                    "OUT/steps_<k>/ from one model load, with OUT/grid.png comparing them (a "
                    "row per prompt).", flag_values=flag_values)
  flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance scale w (1 = none, what "
                     "MLCM LoRAs use: their teacher's guidance is distilled in); for a "
                     "guidance-conditioned UNet (time_cond_proj_dim) the w its guidance "
                     "embedding takes, with no unconditional branch.",
                     flag_values=flag_values)
  flags.DEFINE_string("negative_prompt", None, "The unconditional branch's prompt when "
                      "--guidance_scale != 1 (unset: zero embeddings, as diffusers' SDXL "
                      "pipeline).", flag_values=flag_values)
  flags.DEFINE_enum("sampler", "ddim", list(discrete.SAMPLERS),
                    "ddim: deterministic DDIM jumps between the timesteps (what MLCM LoRAs "
                    "trained here expect); lcm: LCM's sampler, x0 re-noised with fresh noise "
                    "(LCM-LoRA, TLCM); tcd: TCD's sampler with --gamma (TCD-LoRA, Hyper-SD); "
                    "dpmpp_2m: DPM-Solver++(2M), for the base model at e.g. 25 steps; "
                    "dpmpp_2s: DPM-Solver++(2S), two calls per step (through the timestep "
                    "midway) but the last.",
                    flag_values=flag_values)
  flags.DEFINE_float("gamma", 0.3, "TCD's stochasticity (diffusers' eta): 0 deterministic, 1 "
                     "fully re-noised.", flag_values=flag_values)
  flags.DEFINE_string("timesteps", "uniform", "uniform (MLCM's segment starts 999, 750, 500, "
                      "250), trailing (999, 749, 499, 249), leading (diffusers' SDXL default: "
                      "751, 501, 251, 1), lcm (LCMScheduler's 999, 759, 499, 259) or an explicit "
                      "list, e.g. 999,749,499,124 (one per step).",
                      flag_values=flag_values)
  flags.DEFINE_string("init_image", None, "Image-to-image: start from this image (resized to "
                      "--resolution), noised to the --strength part of the grid.",
                      flag_values=flag_values)
  flags.DEFINE_float("strength", 0.5, "With --init_image: the fraction of the --steps grid run "
                     "(diffusers' strength: the last int(steps * strength) timesteps).",
                     flag_values=flag_values)
  flags.DEFINE_string("controlnet", "", "A diffusers SDXL ControlNet directory (config.json and "
                      "diffusion_pytorch_model[.fp16].safetensors) to condition on "
                      "--control_image.", flag_values=flag_values)
  flags.DEFINE_string("control_image", None, "With --controlnet: the control image (e.g. an edge "
                      "map), --resolution pixels square, for every prompt.",
                      flag_values=flag_values)
  flags.DEFINE_float("controlnet_scale", 1.0, "With --controlnet: the scale of its residuals "
                     "(diffusers' controlnet_conditioning_scale).", flag_values=flag_values)
  flags.DEFINE_bool("print_schedule", False, "Print the sampler's timesteps and sigmas (and how "
                    "to set them in ComfyUI / diffusers), then exit without loading models. "
                    "Every run also writes them to OUT/schedule.txt.", flag_values=flag_values)


def parse_flags(argv, flag_values=FLAGS):
  """Defines and parses this program's flags (absl's flags_parser)."""
  define_flags(flag_values)
  return cli.parse_flags(argv, flag_values)


def main(argv, flag_values=FLAGS):
  del argv
  f = flag_values
  steps_list = parse_steps(f.steps)
  try:  # before any model loads
    for steps in steps_list:
      pipeline.check_generation(steps, f.batch_size, f.guidance_scale, f.gamma)
    strength = f.strength if f.init_image else 1.0
    schedules = [schedule_text(steps, f.timesteps, f.sampler, strength) for steps in steps_list]
  except errors.UserError as e:
    raise errors.UserError(f"--{e}") from e
  if f.print_schedule:
    print("\n".join(schedules), end="")
    return
  if (f.prompt is None) == (f.prompts is None):
    raise errors.UserError("pass exactly one of --prompt (one prompt) and --prompts (a file)")
  sdxl_dir = check_pipeline_flags(f, ("sdxl",))
  scales = parse_scales(f.lora_scale)
  if bool(f.controlnet) != bool(f.control_image):
    raise errors.UserError("--controlnet and --control_image go together; pass both or neither")
  init = plotting.read_image(f.init_image, f.resolution) if f.init_image else None
  control = (plotting.read_image(f.control_image, f.resolution, resize=False)
             if f.control_image else None)
  prompts = [f.prompt] if f.prompt is not None else prompt_data.load_prompts(f.prompts)
  models = pipeline.load_pipeline(sdxl_dir, [p for p in f.lora.split(",") if p],
                                  scales[0] if len(scales) == 1 else scales,
                                  unet_dir=f.unet and hub.local_path(f.unet, "--unet"),
                                  controlnet_dir=f.controlnet and hub.local_path(
                                      f.controlnet, "--controlnet"))
  by_steps = []
  for steps, schedule in zip(steps_list, schedules):
    images = pipeline.generate_images(models, prompts, steps, f.resolution, f.seed,
                                      f.batch_size, f.timesteps, f.sampler, f.guidance_scale,
                                      f.negative_prompt, init, strength, f.gamma, control,
                                      f.controlnet_scale)
    out = f.out if len(steps_list) == 1 else os.path.join(f.out, f"steps_{steps}")
    storage.makedirs(out)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
      plotting.save_image(os.path.join(out, f"{i:05d}_{_slug(prompt)}.png"), image)
    plotting.image_grid(os.path.join(out, "grid.png"), images)
    storage.write_text(os.path.join(out, "schedule.txt"), schedule)
    logging.info("%d images (%d steps) -> %s", len(images), steps, out)
    by_steps.append(images)
  if len(steps_list) > 1:  # a row per prompt, a column per step count
    plotting.image_grid(os.path.join(f.out, "grid.png"),
                        np.stack(by_steps, axis=1).reshape((-1,) + by_steps[0].shape[1:]),
                        ncols=len(steps_list))
    logging.info("steps %s side by side -> %s", ",".join(f.steps),
                 os.path.join(f.out, "grid.png"))


if __name__ == "__main__":
  cli.run(main, parse_flags)
