"""Text-to-image evaluation of an MLCM LoRA per step count: CLIP score and aesthetic score.

  python -m mcm_jax.t2i_eval --sdxl=/models/sdxl-base --lora=runs/mlcm/stage2/lora \\
      --prompts=coco2017_captions_5k.txt --steps=1,2,4,8 --clip=/models/clip-vit-large-patch14 \\
      --aesthetic_head=/models/sac+logos+ava1-l14-linearMSE.pth --out=eval/

CLIP score = ``100 * max(cos(E_image, E_text), 0)`` averaged over prompts (torchmetrics'
definition; MLCM reports it with ViT-L/14 on 5k MSCOCO-2017 captions). Writes
``eval.json`` ({steps: {clip_score, aesthetic, num}}) and ``grid_<steps>step.png``. Bad input
ends in one message and exit code 2 (``mcm_jax/cli.py``); ``--debug`` shows the traceback.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from mcm_jax import cli, errors, generate, hub, plotting, rewards, storage
from mcm_jax.data import prompts as prompt_data


def clip_scorer(clip_dir):
  """(``score(params, images [-1, 1] NHWC, input_ids [B, 77]) -> [B]``, params, tokenize)
  from a whole local CLIP model directory (model + tokenizer)."""
  from transformers import CLIPTokenizer, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  from mcm_jax.models.sdxl import load_flax_transformer  # pylint: disable=g-import-not-at-top
  model, params = load_flax_transformer(FlaxCLIPModel, clip_dir)
  tokenizer = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
  size = model.config.vision_config.image_size

  def score(p, images, input_ids):
    img = model.get_image_features(pixel_values=rewards.clip_preprocess(images, size), params=p)
    txt = model.get_text_features(input_ids=input_ids, params=p)
    cos = jnp.sum(img * txt, -1) / (jnp.linalg.norm(img, axis=-1) * jnp.linalg.norm(txt, axis=-1))
    return 100.0 * jnp.maximum(cos, 0.0)

  def tokenize(texts):
    return tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="np",
                     max_length=tokenizer.model_max_length).input_ids

  return score, params, tokenize


def evaluate(sdxl_dir, prompts, steps_list, out, clip_dir, aesthetic_head="", lora_path="",
             resolution=1024, batch_size=4, seed=0):
  """{steps: {'clip_score', 'aesthetic' (if a head is given), 'num'}}; also writes files."""
  clip_score, clip_params, tokenize = clip_scorer(clip_dir)
  clip_score = jax.jit(clip_score)
  aesthetic = None
  if aesthetic_head:
    fn, a_params = rewards.aesthetic_scorer(clip_dir, aesthetic_head)
    aesthetic = jax.jit(lambda x: fn(a_params, x))
  storage.makedirs(out)
  pipeline = generate.load_pipeline(sdxl_dir, lora_path)
  results = {}
  for steps in steps_list:
    images = generate.generate_images(pipeline, prompts, steps, resolution, seed, batch_size)
    scores, aes = [], []
    for start in range(0, len(prompts), batch_size):
      x = jnp.asarray(images[start:start + batch_size])
      scores.append(np.asarray(clip_score(clip_params, x,
                                          tokenize(prompts[start:start + batch_size]))))
      if aesthetic is not None:
        aes.append(np.asarray(aesthetic(x)))
    row = {"clip_score": float(np.mean(np.concatenate(scores))), "num": len(prompts)}
    if aes:
      row["aesthetic"] = float(np.mean(np.concatenate(aes)))
    results[str(steps)] = row
    plotting.image_grid(os.path.join(out, f"grid_{steps}step.png"), images[:16])
    logging.info("%d steps: %s", steps, row)
  storage.write_json(os.path.join(out, "eval.json"),
                     {"lora": lora_path, "prompts": len(prompts), "results": results})
  return results


FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  generate.define_pipeline_flags("t2i_eval", flag_values)
  flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Step counts to evaluate (comma-separated "
                    "integers in 1..1000).", flag_values=flag_values)
  flags.DEFINE_string("clip", None, "Local whole CLIP model directory (ViT-L/14 for the paper's "
                      "numbers), with its tokenizer.", flag_values=flag_values)
  flags.DEFINE_string("aesthetic_head", "", "LAION aesthetic predictor head (optional).",
                      flag_values=flag_values)


def parse_flags(argv, flag_values=FLAGS):
  """Defines and parses this program's flags (absl's flags_parser)."""
  define_flags(flag_values)
  return cli.parse_flags(argv, flag_values)


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


def main(argv, flag_values=FLAGS):
  del argv
  f = flag_values
  sdxl_dir = generate.check_pipeline_flags(f, ("sdxl", "prompts", "clip"))
  steps = parse_steps(f.steps)
  clip_dir = hub.local_path(f.clip, "--clip")  # a local dir or a cached hub name
  if f.aesthetic_head and not os.path.isfile(f.aesthetic_head):
    raise FileNotFoundError(f"--aesthetic_head={f.aesthetic_head!r} not found")
  evaluate(sdxl_dir, prompt_data.load_prompts(f.prompts), steps, f.out, clip_dir, f.aesthetic_head,
           f.lora, f.resolution, f.batch_size, f.seed)


if __name__ == "__main__":
  cli.run(main, parse_flags)
