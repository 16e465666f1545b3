"""Text-to-image evaluation of an MLCM LoRA per step count, of its guided teacher and of other
models beside them.

  python -m mcm_jax.t2i_eval --sdxl=/models/sdxl-base --lora=runs/mlcm/stage2/lora \\
      --prompts=coco2017_captions_5k.txt --steps=1,2,4,8 --clip=/models/clip-vit-large-patch14 \\
      --aesthetic_head=/models/sac+logos+ava1-l14-linearMSE.pth --out=eval/ \\
      --model="lcm-lora lora=/models/lcm-lora-sdxl sampler=lcm timesteps=lcm" \\
      --model="sdxl steps=25 timesteps=leading guidance_scale=8 negative_prompt='blurry'"

Each ``--model`` is a name (its rows are ``<name>_<steps>``) and ``key=value`` fields
(``MODEL_FIELDS``: LoRA files and scales, step counts, sampler, timesteps, guidance, TCD's
gamma); it is sampled with the same prompts and noise. The base model loads once; each entry
only attaches its LoRAs.

Scores (``mcm_jax.scorers``) averaged over prompts: CLIP score ``100 max(cos(E_image, E_text), 0)``
(torchmetrics' definition; MLCM reports it with ViT-g/14 on 5k MSCOCO-2017 captions), PickScore
with ``--pickscore``, ImageReward with ``--imagereward``, HPSv2 with ``--hpsv2``, FID against
``--fid_reference`` (clean-fid's convention: both sets 8-bit, each channel resized to 299 px by
PIL's bicubic filter in float, TF's input scaling; the FID Inception's weights), the
LAION aesthetic score with ``--aesthetic_head``; ``--teacher_steps`` adds the guided base model.
Writes ``eval.json`` ({run: {clip_score, pickscore, imagereward, hpsv2, aesthetic, fid, num}}),
``eval.md``, ``metrics.png``, ``grid.png`` and ``grid_<run>.png``. Bad input ends in one message
and exit code 2 (``mcm_jax/cli.py``); ``--debug`` shows the traceback.
"""
import dataclasses
import os
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from mcm_jax import cli, errors, fid, generate, hub, pipeline, plotting, scorers, storage
from mcm_jax import lora as lora_lib
from mcm_jax.data import prompts as prompt_data
from mcm_jax.samplers import discrete

MODEL_FIELDS = ("lora", "lora_scale", "steps", "sampler", "timesteps", "guidance_scale",
                "negative_prompt", "gamma")


@dataclasses.dataclass(frozen=True)
class ModelRun:
  """One model to evaluate beside the LoRA: rows ``<name>_<steps>`` for each of ``steps``,
  ``lora`` files (none = the base model) at ``lora_scale``, and ``generate_images``'s
  ``options`` (sampler, timesteps, guidance_scale, negative_prompt, gamma)."""
  name: str
  steps: tuple
  lora: tuple = ()
  lora_scale: tuple = (1.0,)
  options: dict = dataclasses.field(default_factory=dict)


def parse_model(spec, default_steps):
  """A ``--model`` value, ``NAME key=value ...`` (shell quoting for values with spaces), as a
  ``ModelRun``; steps default to ``default_steps``. A UserError names the value and what is
  allowed."""
  def bad(why):
    return errors.UserError(f"--model={spec!r}: {why}")
  try:
    tokens = shlex.split(spec)
  except ValueError as e:
    raise bad(f"{e}; allowed: NAME key=value ..., values with spaces quoted") from e
  if not tokens or not re.fullmatch(r"[A-Za-z][\w.+-]*", tokens[0]):
    raise bad("it must start with a name (a letter, then letters, digits, '_', '.', '+', '-')")
  fields = {}
  for token in tokens[1:]:
    key, sep, value = token.partition("=")
    if not sep or key not in MODEL_FIELDS:
      raise bad(f"{token!r} is not key=value with a key of {', '.join(MODEL_FIELDS)}")
    fields[key] = value
  options = {k: fields[k] for k in ("sampler", "timesteps", "negative_prompt") if k in fields}
  for key in ("guidance_scale", "gamma"):
    if key in fields:
      try:
        options[key] = float(fields[key])
      except ValueError as e:
        raise bad(f"{key}={fields[key]!r} is not a number") from e
  try:
    steps = (generate.parse_steps(fields["steps"].split(",")) if "steps" in fields
             else default_steps)
    pipeline.check_generation(max(steps), 1, options.get("guidance_scale", 1.0),
                              options.get("gamma", 0.3))
    if options.get("sampler", "ddim") not in discrete.SAMPLERS:
      raise errors.UserError(f"sampler={options['sampler']!r} is not known; allowed: "
                             f"{', '.join(discrete.SAMPLERS)}")
    for k in steps:
      discrete.sampling_grid(k, options.get("timesteps", "uniform"))
  except errors.UserError as e:
    raise bad(str(e)) from e
  lora = tuple(p for p in fields.get("lora", "").split(",") if p)
  scales = tuple(generate.parse_scales(fields["lora_scale"].split(","))) if (
      "lora_scale" in fields) else (1.0,)
  return ModelRun(tokens[0], tuple(steps), lora, scales, options)


def evaluate(sdxl_dir, prompts, steps_list, out, clip_dir, aesthetic_head="", lora_path="",
             resolution=1024, batch_size=4, seed=0, pickscore_dir="", imagereward_dir="",
             imagereward_tokenizer="", hpsv2_dir="", fid_reference="", inception_weights="",
             teacher=None, models=()):
  """{steps: {'clip_score', 'pickscore' (with ``pickscore_dir``), 'imagereward' (with
  ``imagereward_dir``), 'hpsv2' (with ``hpsv2_dir``), 'aesthetic' (with a head), 'fid' (with
  ``fid_reference``, a folder of images, and ``inception_weights``), 'num'}}: prompt-averaged
  scores of each step count's images (FID: of the whole set), and with ``teacher`` ({'steps',
  'guidance_scale', 'negative_prompt', 'sampler'}) a row 'teacher_<steps>' for the base model
  guided on the 'leading' grid (sampler 'ddim' = diffusers' Euler, or 'dpmpp_2m'). Writes
  eval.json, eval.md (the table), metrics.png (each metric against steps, the teacher as a
  line), grid.png (a row per run, the same prompts and noise) and grid_<run>.png. Each of
  ``models`` (``ModelRun``) adds its rows ``<name>_<steps>``."""
  read = {p: lora_lib.read(p) for m in models for p in m.lora}  # a bad file fails first
  text_scores = {"clip_score": (scorers.clip_score, clip_dir)}
  if pickscore_dir:
    text_scores["pickscore"] = (scorers.pick_score, pickscore_dir)
  if hpsv2_dir:
    text_scores["hpsv2"] = (scorers.hps_score, hpsv2_dir)
  loaded = {}  # name -> scorers.Scorer
  for name, (kind, directory) in text_scores.items():
    model = scorers.load_clip(directory)
    loaded[name] = scorers.Scorer(kind(model), model.params, model.tokenize)
  if imagereward_dir:
    loaded["imagereward"] = scorers.load_imagereward(imagereward_dir,
                                                     imagereward_tokenizer or None)
  if aesthetic_head:
    loaded["aesthetic"] = scorers.load_aesthetic(clip_dir, aesthetic_head)
  jitted = {name: jax.jit(s.score) for name, s in loaded.items()}
  storage.makedirs(out)
  if fid_reference:
    inception = fid.clean_inception_feature_fn(inception_weights)
    mu_ref, sigma_ref, n_ref = fid.folder_statistics(fid_reference, inception, batch_size)
    logging.info("FID reference: %d images of %s", n_ref, fid_reference)
  base = pipeline.load_pipeline(sdxl_dir, lora_path)
  runs = [(str(steps), base, steps, {}) for steps in steps_list]
  for model in models:  # the base model loaded once; each entry attaches its own LoRAs
    adapted = pipeline.with_loras(base, list(model.lora), list(model.lora_scale)
                                  if len(model.lora_scale) > 1 else model.lora_scale[0], read)
    runs += [(f"{model.name}_{steps}", adapted, steps, model.options) for steps in model.steps]
  if teacher is not None:  # the base model (the LoRA's frozen weights), guided
    runs.append((f"teacher_{teacher['steps']}", pipeline.with_loras(base), teacher["steps"],
                 dict(timesteps="leading", guidance_scale=teacher["guidance_scale"],
                      negative_prompt=teacher.get("negative_prompt"),
                      sampler=teacher.get("sampler", "ddim"))))
  results, grids = {}, []
  for run, run_models, steps, options in runs:
    images = pipeline.generate_images(run_models, prompts, steps, resolution, seed, batch_size,
                                      **options)
    scores = {name: [] for name in loaded}
    for start in range(0, len(prompts), batch_size):
      x = jnp.asarray(images[start:start + batch_size])
      texts = prompts[start:start + batch_size]
      for name, s in loaded.items():
        tokens = s.tokenize(texts) if s.tokenize else None
        scores[name].append(np.asarray(jitted[name](s.params, x, tokens)))
    row = {name: float(np.mean(np.concatenate(v))) for name, v in scores.items()}
    if fid_reference:
      feats, _ = fid.batched_features(inception, fid.to_inception_size(images), batch_size)
      row["fid"] = float(fid.frechet_distance(*fid.statistics(feats), mu_ref, sigma_ref))
    results[run] = dict(row, num=len(prompts))
    plotting.image_grid(os.path.join(out, f"grid_{run}.png"), images[:16])
    grids.append(images[:GRID_COLUMNS])
    logging.info("%s: %s", run, results[run])
  storage.write_json(os.path.join(out, "eval.json"),
                     {"lora": lora_path, "models": [dataclasses.asdict(m) for m in models],
                      "prompts": len(prompts), "results": results})
  storage.write_text(os.path.join(out, "eval.md"), markdown_table(results))
  plotting.image_grid(os.path.join(out, "grid.png"), np.concatenate(grids),
                      ncols=len(grids[0]))  # one row per run: the same prompts and noise
  curves = {"LoRA" if lora_path else "base model":
                {run: row for run, row in results.items() if run.isdigit()}}
  curves.update({m.name: {str(k): results[f"{m.name}_{k}"] for k in m.steps} for m in models})
  lines = {name: next(iter(c.values())) for name, c in curves.items() if len(c) == 1}
  lines.update({r: row for r, row in results.items() if r.startswith("teacher_")})
  curves = {name: c for name, c in curves.items() if len(c) > 1}
  if curves:  # each metric against steps; single-step models and the teacher as lines
    plotting.metric_curves(os.path.join(out, "metrics.png"), curves, lines)
  return results


GRID_COLUMNS = 8


def markdown_table(results):
  """Runs as rows, metrics as columns (the order of the first run's metrics)."""
  metrics = [m for m in next(iter(results.values())) if m != "num"] + ["num"]
  lines = ["| run | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
  for run, row in results.items():
    cells = [f"{row[m]:.4g}" if isinstance(row.get(m), float) else str(row.get(m, ""))
             for m in metrics]
    lines.append(f"| {run} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  generate.define_pipeline_flags("t2i_eval", flag_values)
  flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Step counts to evaluate (comma-separated "
                    "integers in 1..1000).", flag_values=flag_values)
  flags.DEFINE_string("clip", None, "Local whole CLIP model directory (ViT-L/14 for the paper's "
                      "numbers), with its tokenizer.", flag_values=flag_values)
  flags.DEFINE_string("pickscore", "", "Local PickScore model directory (a CLIP ViT-H/14 in the "
                      "transformers layout, e.g. yuvalkirstain/PickScore_v1, with its tokenizer; "
                      "optional).", flag_values=flag_values)
  flags.DEFINE_string("hpsv2", "", "HPSv2 / v2.1 as a transformers-layout CLIP directory "
                      "(python -m mcm_jax.convert_open_clip --checkpoint=HPS_v2.1_compressed.pt "
                      "--model=ViT-H-14 --out=DIR; optional).", flag_values=flag_values)
  flags.DEFINE_string("imagereward", "", "Local ImageReward directory: ImageReward.pt and "
                      "med_config.json (THUDM/ImageReward), with bert-base-uncased's vocab.txt "
                      "unless --imagereward_tokenizer is given (optional).",
                      flag_values=flag_values)
  flags.DEFINE_string("imagereward_tokenizer", "", "Directory (or cached hub name) of the BERT "
                      "uncased tokenizer ImageReward uses, e.g. bert-base-uncased.",
                      flag_values=flag_values)
  flags.DEFINE_string("coco_captions", "", "COCO's captions_val2017.json instead of --prompts: "
                      "one caption each of --num_prompts images picked with --seed (MLCM's "
                      "MSCOCO-2017 5k protocol).", flag_values=flag_values)
  flags.DEFINE_integer("num_prompts", 5000, "With --coco_captions: how many.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("teacher_steps", 0, "Add a row for the base model guided (no LoRA), "
                       "sampled with this many Euler steps on the 'leading' grid, e.g. 25 (0 = "
                       "none).", flag_values=flag_values)
  flags.DEFINE_float("teacher_guidance_scale", 8.0, "The teacher row's guidance scale.",
                     flag_values=flag_values)
  flags.DEFINE_enum("teacher_sampler", "ddim", ["ddim", "dpmpp_2m", "dpmpp_2s"],
                    "The teacher row's sampler: ddim (= diffusers' Euler on these timesteps), "
                    "dpmpp_2m (DPM-Solver++(2M)) or dpmpp_2s (DPM-Solver++(2S)).",
                    flag_values=flag_values)
  flags.DEFINE_string("teacher_negative_prompt", None, "The teacher row's negative prompt.",
                      flag_values=flag_values)
  flags.DEFINE_multi_string("model", [], "Another model to evaluate (repeatable): 'NAME "
                            "key=value ...' with keys " + ", ".join(MODEL_FIELDS) + ", e.g. "
                            "'lcm-lora lora=/models/lcm-lora-sdxl sampler=lcm timesteps=lcm' or "
                            "'sdxl steps=25 timesteps=leading guidance_scale=8'; rows "
                            "NAME_<steps>.", flag_values=flag_values)
  flags.DEFINE_string("fid_reference", "", "A folder of reference images (e.g. COCO-2017 val) "
                      "for FID of each step count's images (needs --inception_weights; "
                      "optional).", flag_values=flag_values)
  flags.DEFINE_string("inception_weights", "", "pytorch-fid's pt_inception-2015-12-05-*.pth (or "
                      ".npz of it), a local file.", flag_values=flag_values)
  flags.DEFINE_string("aesthetic_head", "", "LAION aesthetic predictor head (optional).",
                      flag_values=flag_values)


def parse_flags(argv, flag_values=FLAGS):
  """Defines and parses this program's flags (absl's flags_parser)."""
  define_flags(flag_values)
  return cli.parse_flags(argv, flag_values)


def main(argv, flag_values=FLAGS):
  del argv
  f = flag_values
  if bool(f.prompts) == bool(f.coco_captions):
    raise errors.UserError("pass exactly one of --prompts (a prompt file) and --coco_captions "
                           "(COCO's captions_*.json)")
  sdxl_dir = generate.check_pipeline_flags(f, ("sdxl", "clip"))
  steps = generate.parse_steps(f.steps)
  teacher = None
  if f.teacher_steps:
    if not 1 <= f.teacher_steps <= 1000:
      raise errors.UserError(f"--teacher_steps={f.teacher_steps} is invalid; allowed: 0 (no "
                             "teacher row) or 1..1000, e.g. 25")
    teacher = dict(steps=f.teacher_steps, guidance_scale=f.teacher_guidance_scale,
                   negative_prompt=f.teacher_negative_prompt, sampler=f.teacher_sampler)
  clip_dir = hub.local_path(f.clip, "--clip")  # a local dir or a cached hub name
  pickscore_dir = hub.local_path(f.pickscore, "--pickscore") if f.pickscore else ""
  imagereward_dir = hub.local_path(f.imagereward, "--imagereward") if f.imagereward else ""
  hpsv2_dir = hub.local_path(f.hpsv2, "--hpsv2") if f.hpsv2 else ""
  tokenizer_dir = (hub.local_path(f.imagereward_tokenizer, "--imagereward_tokenizer")
                   if f.imagereward_tokenizer else "")
  if f.fid_reference and not f.inception_weights:
    raise errors.UserError("--fid_reference needs --inception_weights (a local copy of "
                           "pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
  if f.aesthetic_head and not os.path.isfile(f.aesthetic_head):
    raise FileNotFoundError(f"--aesthetic_head={f.aesthetic_head!r} not found")
  models = [parse_model(spec, steps) for spec in f.model]
  names = [m.name for m in models]
  if len(set(names)) != len(names):
    raise errors.UserError(f"--model names {names} repeat; allowed: a distinct name each")
  prompts = (prompt_data.load_prompts(f.prompts) if f.prompts else
             prompt_data.coco_captions(f.coco_captions, f.num_prompts, f.seed))
  evaluate(sdxl_dir, prompts, steps, f.out, clip_dir, f.aesthetic_head,
           [p for p in f.lora.split(",") if p], f.resolution, f.batch_size, f.seed,
           pickscore_dir, imagereward_dir, tokenizer_dir, hpsv2_dir, f.fid_reference,
           f.inception_weights, teacher, models)


if __name__ == "__main__":
  cli.run(main, parse_flags)
