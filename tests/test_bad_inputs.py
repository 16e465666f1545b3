"""Bad input on every command-line program ends in one clear message: a non-zero exit code
(2), stderr naming the offending value or path, and no Python traceback.

Most cases run in one subprocess (``_DRIVER``): it parses each case's argv with the program's
own ``parse_flags`` into fresh flag values and runs the program's checks
(``main.checked_config``, ``generate.main``, ``t2i_eval.main``; all cases fail before anything
is compiled) through ``cli.call``, the helper every program's ``cli.run`` uses. A few
cases run the real programs end to end (absl's app.run, ``--debug``), and a refused resume is
checked to leave the run's config.json as it was.
"""
import json
import os
import subprocess
import sys

import pytest

import helpers  # tests/

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), MCM_JAX_DEBUG="")

_DRIVER = r"""
import contextlib, importlib.util, io, json, sys, traceback
from absl import flags
from mcm_jax import cli

def run_case(kind, argv):
  fv = flags.FlagValues()
  if kind == "main":
    from mcm_jax import main
    sys.modules.pop("config_config", None)  # ml_collections' config module: one per process
    main.parse_flags(["main"] + argv, fv)
    main.checked_config(fv)
  elif kind in ("generate", "t2i_eval"):
    module = importlib.import_module("mcm_jax." + kind)
    module.parse_flags([kind] + argv, fv)
    module.main([], fv)
  else:  # a benchmark script (argparse)
    spec = importlib.util.spec_from_file_location("bench", kind)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sys.argv = [kind] + argv
    bench.main()
  raise AssertionError("the case did not fail")

results = []
for kind, argv in json.load(sys.stdin):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      code = cli.call(run_case, kind, argv)
    except SystemExit as e:  # argparse
      code = e.code
    except BaseException:  # pylint: disable=broad-except
      code = "uncaught"
      traceback.print_exc(file=err)
  results.append([code, err.getvalue()])
print("RESULTS" + json.dumps(results))
"""


def _run_driver(cases, timeout=600):
  """[(exit code, stderr)] of each (kind, argv) case, run in one subprocess."""
  proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(cases), cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=timeout)
  assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULTS", 1)[1])


def _check(cases, results):
  failures = []
  for (kind, argv, wanted), (code, stderr) in zip(cases, results):
    problems = []
    if code != 2:  # cli.EXIT_BAD_INPUT, and argparse's
      problems.append(f"exit code {code}")
    if "Traceback" in stderr:
      problems.append("a traceback")
    problems += [f"no {w!r}" for w in wanted if w not in stderr]
    if problems:
      failures.append(f"{kind} {argv}: {', '.join(problems)}; stderr:\n{stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)


TOY, PIX, MLCM = ("--config=configs/toy.py:tiny", "--config=configs/imagenet64_cd.py:tiny",
                  "--config=configs/sdxl_mlcm.py:tiny")

# (argv, substrings stderr must hold): every experiment's config, unknown fields, bad sizes,
# missing / wrong files, bad flags.
MAIN_CASES = [
    # toy
    ([TOY, "--config.teacher.steps=0"], ["config.teacher.steps=0", "integer >= 1"]),
    ([TOY, "--config.student.batch_size=-4"], ["config.student.batch_size=-4"]),
    ([TOY, "--config.sweep.student_steps=(0,2)"], ["config.sweep.student_steps=(0, 2)"]),
    ([TOY, "--config.sweep.num_seeds=0"], ["config.sweep.num_seeds=0", "integer >= 1"]),
    ([TOY, "--config.consistency.teacher_steps_start=1"], ["teacher_steps_start=1"]),
    ([TOY, "--config.consistency.xvar_frac=-0.5"], ["xvar_frac=-0.5"]),
    ([TOY, "--config.consistency.loss_weight=snr"], ["loss_weight='snr'"]),
    ([TOY, "--config.sweep.methods=('ct','pd')"], ["sweep.methods=('ct', 'pd')"]),
    ([TOY, "--config.data.name=spiral9"], ["data.name='spiral9'", "ring8"]),
    ([TOY, "--config.schedule.name=linear"], ["schedule.name='linear'", "cosine"]),
    ([TOY, "--config.eval.num_samples=1000"], ["num_samples=1000", "multiple of 1024"]),
    ([TOY, "--config.model.depth=0"], ["config.model.depth=0"]),
    ([TOY, "--config.experiment=gan"], ["experiment='gan'", "'toy'"]),
    # unknown fields, bad override values
    (["--config.teacher.bogus=1"], ["config.teacher.bogus", "configs/toy.py", "batch_size"]),
    ([TOY, "--config.teacher.step=5"], ["did you mean config.teacher.steps"]),
    ([TOY, "--config.bogus.x=1"], ["config.bogus.x", "consistency"]),
    ([MLCM, "--config.mlcm.skipp=3"], ["config.mlcm.skipp", "did you mean config.mlcm.skip?"]),
    ([PIX, "--config.model.sise=small"], ["config.model.sise", "config.model.size"]),
    ([TOY, "--config.teacher.steps=abc"], ["--config.teacher.steps=abc"]),
    ([TOY, "--config.teacher.ema_decay=fast"], ["--config.teacher.ema_decay=fast"]),
    ([TOY, "--config.teacher=3"], ["--config.teacher=3", "not a dict"]),
    ([TOY, "--config.fig1.enabled=maybe"], ["--config.fig1.enabled=maybe"]),
    # config files and their sizes
    (["--config=configs/imagenet64_base.py:huge"], ["'huge'", "'small', 'large', 'tiny'"]),
    (["--config=configs/sdxl_mlcm.py:huge"], ["'huge'", "'sdxl', 'tiny'"]),
    (["--config=configs/toy.py:small"], ["'small'", "'tiny'"]),
    (["--config=configs/nonexistent.py"], ["configs/nonexistent.py", "not found"]),
    (["--config=configs/common.py"], ["configs/common.py", "get_config"]),
    (["--config=README.md"], ["README.md", "not valid Python"]),
    # other flags
    ([TOY, "--mode=test"], ["--mode=test", "train|eval"]),
    ([TOY, "--mode=eval"], ["--mode=eval", "pixel"]),
    ([TOY, "--no_such_flag=1"], ["no_such_flag"]),
    ([TOY, "--workdir=README.md"], ["--workdir='README.md'", "directory"]),
    ([MLCM, "--stage=1"], ["--stage=1 is for --mode=plan", "--mode=train"]),
    ([MLCM, "--mode=plan", "--topology=v5e:2x2", "--stage=2"],
     ["--stage=2", "config.mlcm.num_stages=2", "allowed: 0, 1"]),
    ([PIX, "--mode=plan", "--topology=v5e:2x2", "--stage=1"], ["--stage=1", "allowed: 0"]),
    # pixel
    ([PIX, "--config.objective=pd"], ["objective='pd'", "'base', 'cd', 'ct'"]),
    ([PIX, "--config.init_from="], ["config.init_from is empty"]),
    ([PIX, "--config.sample.x_var=exact"], ["sample.x_var='exact'"]),
    ([PIX, "--config.eval.features=clip"], ["eval.features='clip'"]),
    ([PIX, "--config.consistency.student_steps=0"], ["consistency.student_steps=0"]),
    ([PIX, "--config.consistency.teacher_sampler=euler"], ["teacher_sampler='euler'"]),
    ([PIX, "--config.data.name=imagenet2012"], ["data.data_dir=''", "imagenet2012"]),
    ([PIX, "--config.eval.num=1"], ["config.eval.num=1"]),
    ([PIX, "--config.sample.every=7"], ["sample.every=7"]),
    ([PIX, "--config.train.ema_decay=1.5"], ["train.ema_decay=1.5"]),
    ([PIX, "--config.data.resolution=10"], ["data.resolution=10"]),
    ([PIX, "--config.model.remat=some"], ["config.model.remat='some'", "'full'"]),
    ([PIX, "--config.data.reading.workers=-1"], ["config.data.reading.workers=-1",
                                                 "integer >= 0"]),
    # mlcm
    ([MLCM, "--config.lora.rank=0"], ["config.lora.rank=0", "integer >= 1"]),
    ([MLCM, "--config.lora.scale=0.0"], ["config.lora.scale=0.0"]),
    ([MLCM, "--config.lora.targets=()"], ["config.lora.targets=()"]),
    ([MLCM, "--config.mlcm.num_segments=3"], ["num_segments=3", "divisible by 2"]),
    ([MLCM, "--config.mlcm.skip=300"], ["config.mlcm.skip=300"]),
    ([MLCM, "--config.mlcm.num_stages=0"], ["config.mlcm.num_stages=0"]),
    ([MLCM, "--config.mlcm.guidance_scale=-1.0"], ["config.mlcm.guidance_scale=-1.0"]),
    ([MLCM, "--config.mlcm.huber_eps=0.0"], ["config.mlcm.huber_eps=0.0"]),
    ([MLCM, "--config.mlcm.teacher_mode=ema"], ["teacher_mode='ema'", "'updated'"]),
    ([MLCM, "--config.mlcm.source=none"], ["source='none'", "'images'"]),
    ([MLCM, "--config.images.reading.threads=-2"], ["config.images.reading.threads=-2"]),
    ([MLCM, "--config.text_encoder=clip"], ["text_encoder='clip'"]),
    ([MLCM, "--config.dtype=float8"], ["config.dtype='float8'"]),
    ([MLCM, "--config.unet.remat=some"], ["config.unet.remat='some'", "'dots'"]),
    ([MLCM, "--config.unet.attention=flash"], ["config.unet.attention='flash'", "'chunked'"]),
    ([MLCM, "--config.unet.frozen_dtype=int8"], ["config.unet.frozen_dtype='int8'"]),
    ([MLCM, "--config.latent_resolution=6"], ["config.latent_resolution=6"]),
    ([MLCM, "--config.sample.num=0"], ["config.sample.num=0"]),
    ([MLCM, "--config.rewards.scorer=aesthetic"], ["rewards.scorer", "student_unet"]),
    ([MLCM, "--config.rewards.scorer=aesthetic", "--config.student_unet=/x",
      "--config.rewards.clip_dir=/c", "--config.rewards.head=/h",
      "--config.rewards.fl_weight=-1.0"], ["config.rewards.fl_weight=-1.0"]),
    ([MLCM, "--config.rewards.scorer=imagereward", "--config.student_unet=/x"],
     ["config.rewards.imagereward_dir=''", "ImageReward.pt"]),
    ([MLCM, "--config.rewards.scorer=hpsv2", "--config.student_unet=/x"],
     ["rewards.scorer", "'hpsv2'", "'imagereward'"]),
    ([MLCM, "--config.rewards.scorer=imagereward+imagereward", "--config.student_unet=/x"],
     ["rewards.scorer='imagereward+imagereward'", "joined by '+'"]),
    ([MLCM, "--config.rewards.scorer=imagereward+aesthetic", "--config.student_unet=/x",
      "--config.rewards.clip_dir=/c", "--config.rewards.head=/h",
      "--config.rewards.imagereward_dir=/i", "--config.rewards.threshold=2.0"],
     ["config.rewards.threshold=(2.0,)", "one number per scorer (2: imagereward+aesthetic)"]),
    ([MLCM, "--config.rewards.scorer=aesthetic", "--config.student_unet=/x",
      "--config.rewards.clip_dir=/c", "--config.rewards.head=/h",
      "--config.rewards.fl_from_stage=-1"], ["config.rewards.fl_from_stage=-1", "integer >= 0"]),
    # images into latents (LCF, image-based MLCD)
    ([MLCM, "--config.mlcm.source=images"], ["config.images.dir is empty", "source='images'"]),
    ([MLCM, "--config.mlcm.source=images", "--config.images.dir=/i"],
     ["source='images' needs config.student_unet", "VAE"]),
    ([MLCM, "--config.images.dir=/i"], ["images.dir='/i' is set", "source='mdi'"]),
    ([MLCM, "--config.mlcm.teacher_step=data"], ["teacher_step='data'", "source='images'"]),
    (["--config=configs/sdxl_lcf.py:tiny", "--config.student_unet=/x", "--config.images.dir=/i",
      "--config.mlcm.bank.dir=/b"], ["bank.dir='/b'", "bank.dir='' with images"]),
]

BENCH_CASES = [
    ("benchmarks/pixel.py", ["--sizes=huge"], ["--sizes", "'huge'", "tiny, small, large"]),
    ("benchmarks/pixel.py", ["--dtype=float8"], ["--dtype", "'float8'", "float32"]),
    ("benchmarks/mlcm.py", ["--rank=0"], ["--rank", "'0'", "integer >= 1"]),
]


def _write_files(t):
  """Prompt files and LoRA files, each bad in one way (LoRA: the tiny SDXL UNet's modules;
  down_blocks.1's attention projections are [64, 64]); returns the LoRA paths."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  for name, content in {"p.txt": b"lower newer\n", "bad.jsonl": b'{"prompt": "a"}\n{"prompt": b',
                        "bad.csv": b"a,b\n", "empty.txt": b"\n \n",
                        "latin1.txt": b"ok\ncaf\xe9\n", "list.jsonl": b'["a"]\n'}.items():
    with open(os.path.join(t, name), "wb") as f:
      f.write(content)
  module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
  zeros = lambda *shape: np.zeros(shape, np.float32)
  files = {
      "other_unet": {f"{module}.lora_A.weight": zeros(4, 32),
                     f"{module}.lora_B.weight": zeros(64, 4)},
      "other_rank": {f"{module}.lora_A.weight": zeros(4, 64),
                     f"{module}.lora_B.weight": zeros(64, 8)},
      "other_module": {
          f"{module.replace('blocks.1', 'blocks.0')}.lora_A.weight": zeros(4, 32),
          f"{module.replace('blocks.1', 'blocks.0')}.lora_B.weight": zeros(32, 4)},
      "unknown_layout": {"unet.mid_block.bogus.weight": zeros(4, 64)},
  }
  paths = {}
  for name, tensors in files.items():
    paths[name] = os.path.join(t, f"{name}.safetensors")
    save_file(tensors, paths[name])
  paths["truncated"] = os.path.join(t, "truncated.safetensors")
  with open(paths["other_unet"], "rb") as f:
    data = f.read()
  with open(paths["truncated"], "wb") as f:
    f.write(data[:len(data) // 2])
  return paths


def _with_out(argv, out):
  return argv + [out] * (not any(a.startswith("--out=") for a in argv))


def test_bad_inputs_of_every_program(tmp_path):
  """main with each experiment's config, generate, t2i_eval and the benchmarks: inputs that
  fail before any model is loaded (--sdxl is an empty directory here)."""
  t = str(tmp_path)
  workdir = os.path.join(t, "run")
  lora = _write_files(t)
  os.makedirs(os.path.join(t, "sdxl"))
  os.makedirs(os.path.join(t, "bad_config", "unet"))
  with open(os.path.join(t, "bad_config", "unet", "config.json"), "w") as f:
    f.write('{"sample_size": 16,')
  sd, good, clip = f"--sdxl={t}/sdxl", f"--prompts={t}/p.txt", f"--clip={t}"
  gen = [
      ([sd], ["exactly one of --prompt"]),
      ([sd, "--prompt=x", good], ["exactly one of --prompt"]),
      (["--prompt=x"], ["--sdxl is required"]),
      (["--sdxl=/no/such/sdxl", "--prompt=x"], ["/no/such/sdxl"]),
      ([sd, "--prompt=x", "--steps=0"], ["--steps=0"]),
      ([sd, "--prompt=x", "--steps=a"], ["--steps=a"]),
      ([sd, "--prompt=x", "--batch_size=0"], ["--batch_size=0"]),
      ([sd, "--prompt=x", "--resolution=-8"], ["--resolution=-8"]),
      ([sd, "--prompt=x", "--lora_scale=nan"], ["--lora_scale=nan"]),
      ([sd, "--prompt=x", "--guidance_scale=nan"], ["--guidance_scale=nan"]),
      ([sd, "--prompt=x", "--sampler=tcd", "--gamma=1.5"], ["--gamma=1.5", "TCD's eta"]),
      ([sd, "--prompt=x", "--init_image=a.png", "--strength=0.1"],
       ["--strength=0.1 is invalid for 4 steps", "strength >= 0.25"]),
      ([sd, "--prompt=x", f"--init_image={t}/missing.png"], [f"{t}/missing.png", "not found"]),
      ([sd, "--prompt=x", f"--init_image={t}/p.txt"], [f"{t}/p.txt", "not a readable image"]),
      ([sd, f"--prompts={t}/missing.txt"], [f"{t}/missing.txt", "not found"]),
      ([sd, f"--prompts={t}/bad.jsonl"], [f"{t}/bad.jsonl:2", "not a JSON object"]),
      ([sd, f"--prompts={t}/list.jsonl"], [f"{t}/list.jsonl:1", "not an object"]),
      ([sd, f"--prompts={t}/bad.csv"], ["bad.csv", "'.csv'"]),
      ([sd, f"--prompts={t}/empty.txt"], ["empty.txt", "no prompts"]),
      ([sd, f"--prompts={t}/latin1.txt"], [f"{t}/latin1.txt:2", "UTF-8"]),
      ([sd, "--prompt=x", f"--out={t}/p.txt"], [f"--out='{t}/p.txt'"]),
      ([sd, "--prompt=x", f"--lora={t}/nope"], [f"{t}/nope", "not found"]),
      ([sd, "--prompt=x", f"--lora={lora['truncated']}"], [lora["truncated"], "safetensors"]),
      ([sd, "--prompt=x", f"--lora={lora['unknown_layout']}"],
       [lora["unknown_layout"], "LoRA key 'unet.mid_block.bogus.weight'"]),
      ([sd, "--prompt=x", f"--lora={lora['other_rank']}"],
       [lora["other_rank"], "attn1.to_q", "rank 4", "rank 8"]),
      ([sd, "--prompt=x"], ["no unet config.json", f"{t}/sdxl"]),
      ([f"--sdxl={t}/bad_config", "--prompt=x"],
       [f"{t}/bad_config/unet/config.json", "not valid JSON"]),
      ([sd, "--prompt=x", f"--controlnet={t}"], ["--controlnet and --control_image go together"]),
      ([sd, "--prompt=x", f"--controlnet={t}", f"--control_image={t}/edges.png"],
       [f"{t}/edges.png", "a 24x16 image", "allowed: 1024x1024"]),
  ]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new("RGB", (24, 16)).save(os.path.join(t, "edges.png"))
  evals = [
      ([sd, good, clip, "--steps=a"], ["--steps=a", "integers in 1..1000"]),
      ([sd, good, clip, "--steps=1,0"], ["--steps=1,0", "'0'"]),
      ([sd, good, clip, "--steps="], ["--steps=''", "empty"]),
      ([sd, good], ["--clip is required"]),
      ([sd, clip], ["exactly one of --prompts", "--coco_captions"]),
      ([sd, good, clip, f"--coco_captions={t}/p.txt"], ["exactly one of --prompts"]),
      ([sd, clip, f"--coco_captions={t}/p.txt"], [f"{t}/p.txt", "not a COCO captions file"]),
      ([sd, good, clip, "--teacher_steps=-2"], ["--teacher_steps=-2", "e.g. 25"]),
      ([sd, good, clip, f"--fid_reference={t}"], ["--fid_reference needs --inception_weights"]),
      ([sd, good, "--clip=/no/such/clip"], ["/no/such/clip"]),
      ([sd, good, clip, f"--aesthetic_head={t}/head.pth"], [f"{t}/head.pth"]),
      ([sd, good, clip, "--model=lcm sampler=bogus"],
       ["--model='lcm sampler=bogus'", "sampler='bogus' is not known", "dpmpp_2m"]),
      ([sd, good, clip, "--model=lcm steps=2,0"], ["--model='lcm steps=2,0'", "'0' is invalid"]),
      ([sd, good, clip, "--model=lcm timesteps=lcm steps=80"], ["--model=", "timesteps"]),
      ([sd, good, clip, "--model=lcm guidance=3"], ["'guidance=3' is not key=value", "gamma"]),
      ([sd, good, clip, "--model=4step"], ["must start with a name"]),
      ([sd, good, clip, "--model=x negative_prompt='blurry"], ["No closing quotation"]),
      ([sd, good, clip, "--model=a", "--model=a sampler=lcm"], ["names ['a', 'a'] repeat"]),
      ([sd, good, clip, f"--model=a lora={t}/nope.safetensors"], [f"{t}/nope.safetensors"]),
  ]
  out = f"--out={t}/out"
  cases = ([("main", argv + [f"--workdir={workdir}"] * ("--workdir" not in " ".join(argv)),
             wanted) for argv, wanted in MAIN_CASES] + BENCH_CASES
           + [("generate", _with_out(a, out), w) for a, w in gen]
           + [("t2i_eval", _with_out(a, out), w) for a, w in evals])
  assert len({(k, tuple(a)) for k, a, _ in cases}) == len(cases) >= 90  # all distinct
  _check(cases, _run_driver([(k, a) for k, a, _ in cases]))
  assert not os.path.exists(workdir) and not os.path.exists(os.path.join(t, "out"))


def _cli(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env or ENV,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # seven program runs in subprocesses
def test_programs_end_to_end_and_debug(tmp_path):
  """The real programs (absl's app.run): one message and exit code 2; --debug or
  MCM_JAX_DEBUG=1 print the traceback instead."""
  work = f"--workdir={tmp_path / 'run'}"
  cases = [
      ("mcm_jax.main", ["--config.teacher.bogus=1", work], ["config.teacher.bogus"]),
      ("mcm_jax.main", [MLCM, "--config.lora.rank=0", work], ["config.lora.rank=0"]),
      ("mcm_jax.main", ["--config=configs/imagenet64_base.py:huge", work], ["'huge'"]),
      ("mcm_jax.generate", ["--prompt=x"], ["--sdxl is required"]),
      ("mcm_jax.t2i_eval", [f"--sdxl={tmp_path}", f"--prompts={tmp_path}/p.txt",
                            f"--clip={tmp_path}", "--steps=1,a"], ["--steps=1,a", "'a'",
                                                                   "integers in 1..1000"]),
  ]
  for module, argv, wanted in cases:
    proc = _cli(module, *argv)
    assert proc.returncode == 2, (module, argv, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (module, argv, proc.stderr[-2000:])
    assert proc.stderr.count("error: ") == 1, proc.stderr[-2000:]
    for w in wanted:
      assert w in proc.stderr, (module, argv, w, proc.stderr[-2000:])
  for extra, env in (("--debug", None), ("", dict(ENV, MCM_JAX_DEBUG="1"))):
    proc = _cli("mcm_jax.main", TOY, "--config.teacher.steps=0", work, *[extra] * bool(extra),
                env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert "ConfigError: config.teacher.steps=0" in proc.stderr
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_bad_sdxl_and_lora_files(tiny_sdxl_dir, tmp_path):
  """LoRA files that do not fit the UNet, and SDXL directories (copies of the shared tiny one)
  each broken in one way: errors name the file and, for a LoRA, the module and the shapes."""
  import shutil  # pylint: disable=g-import-not-at-top
  t = str(tmp_path)
  lora = _write_files(t)
  broken = {}
  for name, (rel, content) in {
      "trunc_unet": ("unet/diffusion_pytorch_model.safetensors", None),
      "bad_msgpack": ("unet/diffusion_flax_model.msgpack", b"\x85not msgpack at all"),
      "trunc_vae": ("vae/diffusion_pytorch_model.safetensors", None),
      "trunc_text": ("text_encoder/model.safetensors", None)}.items():
    broken[name] = os.path.join(t, name)
    shutil.copytree(tiny_sdxl_dir, broken[name])
    path = os.path.join(broken[name], rel)
    if content is None:
      with open(path, "rb") as f:
        content = f.read()[:-100]
    with open(path, "wb") as f:
      f.write(content)
  sd = f"--sdxl={tiny_sdxl_dir}"
  gen = [
      ([sd, "--prompt=x", f"--lora={lora['other_unet']}"],
       [lora["other_unet"], "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "(32, 4)", "(4, 64)", "(64, 64)"]),
      ([sd, "--prompt=x", f"--lora={lora['other_module']}"],
       [lora["other_module"], "down_blocks.0.attentions.0", "not a Dense layer"]),
      ([sd, "--prompt=x", "--resolution=18"], ["resolution=18", "multiple of 4"]),
      ([f"--sdxl={broken['trunc_unet']}", "--prompt=x"],
       [f"{broken['trunc_unet']}/unet/diffusion_pytorch_model.safetensors", "truncated"]),
      ([f"--sdxl={broken['bad_msgpack']}", "--prompt=x"],
       [f"{broken['bad_msgpack']}/unet/diffusion_flax_model.msgpack", "msgpack"]),
      ([f"--sdxl={broken['trunc_vae']}", "--prompt=x"],
       [f"{broken['trunc_vae']}/vae/diffusion_pytorch_model.safetensors", "truncated"]),
      ([f"--sdxl={broken['trunc_text']}", "--prompt=x"],
       [f"{broken['trunc_text']}/text_encoder/model.safetensors", "truncated"]),
  ]
  out = f"--out={t}/out"
  cases = [("generate", _with_out(a, out), w) for a, w in gen]
  _check(cases, _run_driver([(k, a) for k, a, _ in cases]))
  assert not os.path.exists(os.path.join(t, "out"))


def test_write_config_never_overwrites_a_different_config(tmp_path):
  sys.path.insert(0, ROOT)
  from configs import toy  # pylint: disable=g-import-not-at-top
  from mcm_jax import main  # pylint: disable=g-import-not-at-top
  a, b = toy.get_config("tiny"), toy.get_config("tiny")
  b.teacher.steps = 7
  w = str(tmp_path)
  assert main.write_config(w, a) == os.path.join(w, "config.json")
  first = open(os.path.join(w, "config.json")).read()
  os.utime(os.path.join(w, "config.json"), (0, 0))
  assert main.write_config(w, a) == os.path.join(w, "config.json")  # identical: not rewritten
  assert os.stat(os.path.join(w, "config.json")).st_mtime == 0
  assert main.write_config(w, b) == os.path.join(w, "config_1.json")
  assert json.load(open(os.path.join(w, "config_1.json")))["teacher"]["steps"] == 7
  assert main.write_config(w, b) == os.path.join(w, "config_1.json")  # not written again
  b.teacher.steps = 8
  assert main.write_config(w, b) == os.path.join(w, "config_2.json")
  assert open(os.path.join(w, "config.json")).read() == first
  assert main.write_config(w, b, "eval") == os.path.join(w, "config_eval.json")
  b.teacher.steps = 9
  assert main.write_config(w, b, "eval") == os.path.join(w, "config_eval.json")  # rewritten
  assert json.load(open(os.path.join(w, "config_eval.json")))["teacher"]["steps"] == 9


@pytest.mark.slow  # two training runs in subprocesses
def test_refused_resume_leaves_config_json_untouched(tmp_path):
  """A run's teacher checkpoint exists; the same workdir with another model is refused with one
  message (exit 2), and its config.json is kept: the refused config goes to config_1.json."""
  sys.path.insert(0, ROOT)
  from configs import toy  # pylint: disable=g-import-not-at-top
  from mcm_jax import main  # pylint: disable=g-import-not-at-top
  from mcm_jax.data import toy as toy_data  # pylint: disable=g-import-not-at-top
  from mcm_jax.experiments import toy as toy_experiment  # pylint: disable=g-import-not-at-top
  config = toy.get_config("tiny")
  config.fig1.enabled = False
  workdir = str(tmp_path)
  main.write_config(workdir, config)
  toy_experiment.train_teacher(config, toy_data.as_sampler(config.data.name), 2, workdir, None,
                               steps=2)
  before = open(tmp_path / "config.json", "rb").read()
  proc = _cli("mcm_jax.main", TOY, "--config.fig1.enabled=False", "--config.model.hidden=16",
              f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "does not match this config" in proc.stderr and "teacher/checkpoints" in proc.stderr
  assert "model.hidden: 32 -> 16" in proc.stderr  # the warning naming what differs
  assert open(tmp_path / "config.json", "rb").read() == before
  assert json.load(open(tmp_path / "config_1.json"))["model"]["hidden"] == 16


def test_what_a_user_error_is(monkeypatch):
  """cli.describe: bad input -> exit 2, a training stop -> 3, anything else (a bug) -> None, so
  that its traceback is printed. Input checks raise errors.UserError explicitly, also in the
  pure math modules."""
  from mcm_jax import cli, errors, schedules, train  # pylint: disable=g-import-not-at-top

  def raised(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return e
    raise AssertionError("did not raise")

  assert cli.describe(errors.UserError("u")) == ("u", 2)
  assert cli.describe(errors.MissingExtraError("pip install x"))[1] == 2
  assert cli.describe(raised(lambda: open("/no/such/file")))[1] == 2
  unknown = raised(lambda: schedules.get_logsnr_fn("linear"))
  assert isinstance(unknown, errors.UserError) and cli.describe(unknown)[1] == 2
  assert cli.describe(train.NonFiniteLossError("nan")) == ("training stopped: nan", 3)
  assert cli.describe(errors.LossDivergedError("up")) == ("training stopped: up", 3)
  full = cli.describe(OSError(28, "No space left on device", "/w/bank/shard_0"))
  assert full[1] == 2 and full[0].startswith("a write failed: No space left on device (/w/bank")
  down = cli.describe(TimeoutError("read timed out"))  # an object store, after storage's retries
  assert down == ("storage failed: the object store did not answer (TimeoutError: read timed "
                  "out), after retries. Once the store answers, run the same command again; "
                  "training resumes from its newest complete checkpoint.", 2)
  assert cli.describe(raised(lambda: int("a"))) is None  # not an mcm_jax check
  assert cli.describe(raised(lambda: [].pop())) is None
  assert cli.describe(ValueError("a ValueError is not an input check")) is None
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  assert cli.debug_requested(["prog", "--debug"]) and not cli.debug_requested(["prog"])
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  assert cli.debug_requested(["prog"])
