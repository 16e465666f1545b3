"""``--mode=plan``: the train step compiled for abstract TPU devices (libtpu, no TPU present).

Tiny configs on ``v5e:2x2`` (4 chips). Each config is compiled for TPU once per module (the TPU
compiler needs tens of seconds for each); the tests then read that one executable. The
same configs' real CPU train steps (``pixel.run`` / ``sdxl_mlcm.run`` on the 8 fake CPU devices)
are shown to come from the planner's builder: the same ``train.jit_step`` call, the same HLO.
"""
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet64_base, imagenet64_cd, imagenet64_ct
from configs import sdxl_lcm as sdxl_lcm_config
from configs import sdxl_mlcm as sdxl_mlcm_config
from mcm_jax import errors, lora, mlcm, objectives, plan, sharding, topologies, train
from mcm_jax.flops import jaxpr_flops
from mcm_jax.errors import ConfigError
from mcm_jax.experiments import pixel, sdxl_mlcm
from mcm_jax.models import sdxl

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): it compiles for abstract TPUs")
# A TPU compile takes 30 s to 2 min on 2 cores: every test that compiles is in the slow tier and
# marked tpu_compile (-m "not tpu_compile" leaves them out).
compiles_for_tpu = lambda test: pytest.mark.slow(pytest.mark.tpu_compile(needs_libtpu(test)))
# The persistent compilation cache stores TPU executables it cannot load back without a TPU.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
TOPOLOGY = "v5e:2x2"
KEYS = ("topology", "chips", "mesh", "global_batch", "params", "trainable_params",
        "hbm_capacity_gib_per_chip", "argument_gib_per_chip", "temp_gib_per_chip",
        "output_gib_per_chip", "alias_gib_per_chip", "peak_gib_per_chip",
        "flops_per_step_per_chip", "program_flops_per_step_per_chip", "forward_flops_per_chip",
        "flops_ratio", "ideal_ratio",
        "compile_s", "fits", "host_peak_gib")


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _compiled(config, stage=0):
  devices, spec, hbm = topologies.topology_devices(TOPOLOGY)
  compiled, args, info = plan.compile_step(config, devices, stage=stage)
  report = plan.summarize(config, TOPOLOGY, devices, spec, hbm, compiled, info, stage)
  return config, compiled, args, report


@pytest.fixture(scope="module")
def cd_plan():
  return _compiled(imagenet64_cd.get_config("tiny"))


def _tiny_mlcm_config():
  """The tiny MLCM config on 2 x 2 chips: the frozen UNet's large kernels sharded over 2 chips;
  LoRA rank 256 (factors as large as the tiny UNet's kernels, large enough that GSPMD would
  split them by size) on 16 x 16 latents."""
  config = sdxl_mlcm_config.get_config("tiny")
  config.mesh.fsdp = 2
  config.lora.rank, config.latent_resolution = 256, 16
  return config


@pytest.fixture(scope="module")
def mlcm_plan():
  return _compiled(_tiny_mlcm_config())


@pytest.fixture(scope="module")
def mlcm_stage1_step():
  """Stage 1's step built for the topology with its FLOP ratios (``plan.build``,
  ``plan.reference_flops``); not compiled: stage 0's and CD's steps are."""
  config = _tiny_mlcm_config()
  devices, _, _ = topologies.topology_devices(TOPOLOGY)
  step, args, info = plan.build(config, devices, stage=1)
  forward_flops, ideal_flops = plan.reference_flops(config, devices, info.pop("forward"),
                                                    stage=1)
  ratios = dict(flops_ratio=plan.program_flops(step, args, len(devices)) / forward_flops,
                ideal_ratio=ideal_flops / forward_flops)
  return config, args, info, ratios


def _padded_bytes(x, fmt):
  """Bytes of one chip's shard of argument ``x`` in the layout XLA chose (``fmt``): the shard's
  dimensions in major-to-minor order, the minor ones rounded up to the layout's tile."""
  shape = x.sharding.shard_shape(x.shape)
  dims = [shape[d] for d in fmt.layout.major_to_minor] or [1]
  for i, t in enumerate((fmt.layout.tiling[0] if fmt.layout.tiling else ())[::-1]):
    if len(dims) - 1 - i >= 0:
      dims[len(dims) - 1 - i] = -(-dims[len(dims) - 1 - i] // t) * t
  return int(np.prod(dims)) * x.dtype.itemsize


def _check_report(report, compiled, args, fsdp=1):
  assert set(KEYS) <= set(report), set(KEYS) - set(report)
  assert report["chips"] == 4 and report["mesh"] == {"data": 4 // fsdp, "fsdp": fsdp}
  assert report["hbm_capacity_gib_per_chip"] == 16  # v5e
  shown = {k: report[f"{k}_gib_per_chip"] for k in ("argument", "temp", "output", "alias",
                                                   "peak", "hbm_capacity")}
  assert shown["peak"] == pytest.approx(shown["argument"] + shown["temp"] + shown["output"]
                                        - shown["alias"], abs=3e-4)
  assert report["fits"] == (shown["peak"] <= 0.9 * shown["hbm_capacity"])
  assert report["flops_per_step_per_chip"] > 0
  assert report["flops_ratio"] == pytest.approx(
      report["program_flops_per_step_per_chip"] / report["forward_flops_per_chip"], abs=1e-3)
  # Hand count of the sharded arguments (state, frozen, batch): each chip holds its shard of
  # every leaf; XLA's argument bytes are exactly that, in its tiled TPU layouts.
  leaves = jax.tree_util.tree_leaves(args)
  formats = jax.tree_util.tree_leaves(compiled.input_formats)
  assert len(leaves) == len(formats)
  hand = sum(_padded_bytes(x, f) for x, f in zip(leaves, formats))
  assert compiled.memory_analysis().argument_size_in_bytes == hand
  assert report["argument_gib_per_chip"] == round(hand / 2 ** 30, 4)
  unpadded = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                 for x in leaves)
  assert unpadded <= hand < 2 * unpadded  # tiny shapes: tile padding, not a missed sharding


@compiles_for_tpu
def test_tiny_cd_plan(cd_plan):
  config, compiled, args, report = cd_plan
  _check_report(report, compiled, args)
  model = objectives.uvit_model(config)[0]
  params = _count(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                 *objectives.uvit_inputs(config)))
  assert report["params"] == report["trainable_params"] == params
  assert report["frozen_params"] == params  # CD's teacher: the base run's parameters
  assert report["global_batch"] == config.train.batch_size and report["fits"]
  # teacher + student at s + student forward and backward: 5 forwards (less the first layer's
  # input gradient, which nobody asks for)
  assert 4.9 < report["ideal_ratio"] <= 5.0 and report["flops_ratio"] == report["ideal_ratio"]
  # The UViT is unrolled, so XLA's count (all ops) and the program's (matmuls, convolutions)
  # are of the same program and must agree.
  xla, program = report["flops_per_step_per_chip"], report["program_flops_per_step_per_chip"]
  assert 0.95 < program / xla < 1.05, (program, xla)


def test_only_cd_steps_carry_the_teacher():
  """CT's loss reads no teacher, so its step gets none (frozen None), as base diffusion's."""
  frozen = {name: pixel.abstract_step(module.get_config("tiny")).frozen
            for name, module in (("cd", imagenet64_cd), ("ct", imagenet64_ct),
                                 ("base", imagenet64_base))}
  assert frozen["ct"] is None and frozen["base"] is None
  assert _count(frozen["cd"]) > 0


@compiles_for_tpu
def test_a_step_the_tpu_compiler_refuses_is_a_plan_that_does_not_fit(capsys):
  """libtpu's "Ran out of memory on HBM" is the answer, not a traceback: fits False, the
  temporaries it named, the program's FLOPs, and advice."""
  config = imagenet64_cd.get_config("tiny")
  config.train.batch_size = 2 ** 18  # 65,536 per chip: ~38 GiB of activations on a 16 GiB chip
  report = plan.run(config, TOPOLOGY)
  assert report["fits"] is False and report["peak_gib_per_chip"] is None
  assert "RESOURCE_EXHAUSTED" in report["compile_error"]
  named = float(re.search(r"temporaries \(([\d.]+)G\)", report["compile_error"]).group(1))
  assert report["temp_gib_per_chip"] == pytest.approx(named, abs=1e-3) and named > 16
  assert report["flops_ratio"] == pytest.approx(5, abs=0.05)
  params = _count(jax.eval_shape(objectives.uvit_model(config)[0].init, jax.random.PRNGKey(0),
                                 *objectives.uvit_inputs(config)))
  # arguments by hand: params, EMA, 2 Adam moments, teacher (float32, replicated) + the batch
  batch = 2 ** 18 * 16 * 16 * 4 // 4 + 2 ** 18 * 4 // 4  # x and label: each chip's quarter
  assert report["argument_gib_per_chip"] == pytest.approx((5 * params * 4 + batch) / 2 ** 30,
                                                         abs=1e-4)
  out = capsys.readouterr().out
  assert "does NOT fit: the TPU compiler refused the step" in out
  assert "to fit: temporaries dominate" in out and "batch_size=131072" in out
  assert json.loads(out.strip().splitlines()[-1])["fits"] is False


@compiles_for_tpu
def test_tiny_mlcm_plan(mlcm_plan):
  config, compiled, args, report = mlcm_plan
  _check_report(report, compiled, args, fsdp=2)
  unet = jax.tree_util.tree_leaves(args[1]["unet"])
  sharded = [x for x in unet if x.sharding.shard_shape(x.shape) != x.shape]
  # so the hand count above checks the fsdp split: attention and linear weights are split, the
  # convolution kernels stay replicated (sharding.param_spec), a third of the tiny UNet's weights
  assert _count(sharded) > _count(unet) / 4
  assert not any(sharding.is_conv_kernel(x.shape) for x in sharded)
  assert any(sharding.is_conv_kernel(x.shape) for x in unet)
  unet = jax.eval_shape(sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG).init_weights,
                        jax.random.PRNGKey(0))
  assert report["params"] == _count(unet)
  assert report["trainable_params"] == _count(jax.eval_shape(
      lambda p: sdxl_mlcm.init_lora(config, p), unet))
  assert report["stage"] == 0 and not report["from_bank"]
  # The UNet's blocks are rematerialised (config.unet.remat='full'): one more forward of them
  # in the student's backward, at most one more forward in all.
  ideal, ratio = report["ideal_ratio"], report["flops_ratio"]
  assert ideal + 0.2 < ratio < ideal + 1, (ideal, ratio)


def _batch_gathers_in_transformer_blocks(compiled):
  """The all-gathers along dimension 0 (the batch) inside the UNet's transformer blocks."""
  return [line for line in compiled.as_text().splitlines()
          if " all-gather(" in line and "dimensions={0}" in line
          and "transformer_blocks" in line]


@compiles_for_tpu
def test_each_chip_runs_the_transformer_blocks_on_its_own_examples(mlcm_plan):
  """In the sharded step no chip gathers the batch's activations: the hidden states are kept
  split by batch in the transformer blocks (sharding.constrain_batch; without it, 120 gathers
  at these sizes, and on SDXL every chip held the whole batch) and LoRA factors are replicated
  (sharding.LOW_RANK_FACTORS; rank 256 makes them large enough to be split by size, which made
  GSPMD split the activations by feature and gather their batch at every adapted projection:
  256 gathers at 32 x 32 latents, 14 GiB more temporaries per chip on SDXL)."""
  _, compiled, args, _ = mlcm_plan
  factors = jax.tree_util.tree_leaves(args[0].params)
  large = [x for x in factors if _count(x) >= 2 ** 14]  # large enough to be split by size
  assert len(large) > len(factors) / 2
  assert all(x.sharding.is_fully_replicated for x in factors)
  assert not _batch_gathers_in_transformer_blocks(compiled)


@compiles_for_tpu
def test_tiny_mlcm_plan_of_a_later_stage(mlcm_plan, mlcm_stage1_step):
  """Stage 1 (PDU): the previous stage's LoRA is a frozen input, and the previous MLCM, unguided
  on the batch, replaces the guided teacher on the doubled batch in the image-free loop."""
  config, args, info, report = mlcm_stage1_step
  assert info["report"] == {"stage": 1, "from_bank": False}
  assert "previous" not in mlcm_plan[2][1] and "previous" in args[1]
  assert _count(args[1]["previous"]) == info["trainable_params"] == _count(args[0].params)
  assert config.mlcm.teacher_mode == "updated"
  k0 = config.mlcm.num_segments
  k1 = k0 // 2
  loop0 = k0 + 1  # mdi: up to K steps to t_m, one more to t_n (the same loop)
  loop1 = int(np.ceil((mlcm.T - 1) / (mlcm.T / (2 * k1)))) + 1  # progressive: steps of T / 2K
  # The student's part is the same in both stages; the loop's forwards differ: 2 x loop0 of the
  # guided teacher (no LoRA) against loop1 of the previous MLCM (with its LoRA). In units of one
  # student forward (with its LoRA, applied unmerged): a teacher forward is plain / adapted.
  model, params, _, encode = sdxl_mlcm.abstract_models(config)
  batch = sdxl_mlcm.batch_shapes(config, sdxl_mlcm.conditioning_fn(config, encode), 1)
  denoise, res = sdxl.make_denoiser(model), config.latent_resolution

  def forward(p, b):
    z = jnp.zeros((b["context"].shape[0], res, res, 4))
    return denoise(p, z, jnp.full(z.shape[:1], 500.), {k: b[k] for k in mlcm.CONDITIONING})

  plain = jaxpr_flops(jax.make_jaxpr(forward)(params, batch))
  adapted = jaxpr_flops(jax.make_jaxpr(lambda p, l, b: forward(
      lora.attach(p, l, config.lora.scale), b))(params, args[1]["previous"], batch))
  expected = 2 * loop0 * plain / adapted - loop1
  assert plain < adapted  # the unmerged LoRA's products (rank 256: about the forward's own)
  stage0 = mlcm_plan[3]
  assert stage0["ideal_ratio"] - report["ideal_ratio"] == pytest.approx(expected, abs=0.05)
  assert stage0["flops_ratio"] - report["flops_ratio"] == pytest.approx(expected, abs=0.05)


@compiles_for_tpu
def test_run_prints_a_table_and_the_json_last(cd_plan, capsys, monkeypatch, tmp_path):
  config, compiled, args, report = cd_plan
  info = dict(mesh=report["mesh"], params=report["params"],
              trainable_params=report["trainable_params"],
              frozen_params=report["frozen_params"], compile_s=report["compile_s"],
              forward_flops=report["forward_flops_per_chip"],
              program_flops=report["program_flops_per_step_per_chip"],
              ideal_flops=report["ideal_ratio"] * report["forward_flops_per_chip"], report={})
  monkeypatch.setattr(plan, "compile_step", lambda *a: (compiled, args, info))
  plan.run(config, TOPOLOGY, str(tmp_path))
  lines = capsys.readouterr().out.strip().splitlines()
  last = json.loads(lines[-1])
  assert {k: v for k, v in last.items() if k != "host_peak_gib"} == {
      k: v for k, v in report.items() if k != "host_peak_gib"}
  assert any("peak" in l and "fits" in l for l in lines[:-1])
  assert json.loads((tmp_path / "plan_v5e_2x2.json").read_text())["fits"] is True


def test_advice_names_what_dominates():
  config = imagenet64_cd.get_config("small")
  config.model.remat = "none"
  base = dict(chips=64, mesh={"data": 64, "fsdp": 1}, batch_per_chip=32.0,
              hbm_capacity_gib_per_chip=16)
  temp = plan.advice(dict(base, argument_gib_per_chip=2.0, temp_gib_per_chip=30.0), config)
  assert "temporaries dominate" in temp and "model.remat=full" in temp
  assert "batch_size=1024" in temp and "mesh.fsdp" in temp
  args = plan.advice(dict(base, argument_gib_per_chip=10.0, temp_gib_per_chip=3.0), config)
  assert "arguments dominate" in args and "--config.mesh.fsdp=64" in args
  # arguments beyond HBM come first even when the temporaries are larger still
  both = plan.advice(dict(base, argument_gib_per_chip=23.0, temp_gib_per_chip=27.0), config)
  assert "arguments alone exceed the chip's HBM (23.00 GiB" in both and "mesh.fsdp=64" in both
  mlcm_config = sdxl_mlcm_config.get_config("sdxl")
  mlcm_config.unet.remat = "dots"
  mlcm = dict(base, argument_gib_per_chip=1.0, temp_gib_per_chip=30.0, stage=0, from_bank=False)
  hint = plan.advice(mlcm, mlcm_config)
  assert "--config.unet.remat=full" in hint and "mlcm.bank.dir" in hint
  assert "mlcm.bank.dir" not in plan.advice(dict(mlcm, from_bank=True), mlcm_config)
  assert "mlcm.bank.dir" not in plan.advice(dict(mlcm, stage=1), mlcm_config)


class _Stop(Exception):
  """Raised by the recorded step instead of running it."""


def _record_jit_step(monkeypatch, run_first=0):
  """Replaces ``train.jit_step`` by a recorder: each call's jitted step (and, when the training
  loop calls it, its arguments, after which it stops the run with ``_Stop``). The steps of the
  first ``run_first`` calls run for real (e.g. MLCM's earlier stages)."""
  calls = []
  real = train.jit_step

  class Recorded:
    def __init__(self, step):
      self.step, self.args, self.index = step, None, len(calls)
      self.lower = step.lower

    def __call__(self, *args):
      if self.index < run_first:
        return self.step(*args)
      self.args = args
      raise _Stop

  def recording(*args, **kwargs):
    calls.append(Recorded(real(*args, **kwargs)))
    return calls[-1]

  monkeypatch.setattr(train, "jit_step", recording)
  return calls


@pytest.mark.slow  # a training run's first step and the planner's, each lowered (seconds)
@pytest.mark.parametrize("make_config,run,stage", [
    (lambda: imagenet64_base.get_config("tiny"), pixel.run, 0),
    (lambda: sdxl_mlcm_config.get_config("tiny"), sdxl_mlcm.run, 0),
    pytest.param(lambda: sdxl_mlcm_config.get_config("tiny"), sdxl_mlcm.run, 1,
                 marks=pytest.mark.slow),  # trains stage 0 first
    (lambda: sdxl_lcm_config.get_config("tiny"), sdxl_mlcm.run, 0)],
                         ids=["pixel", "mlcm", "mlcm-stage1", "mlcm-full-unet-guided"])
def test_train_and_plan_build_the_same_step(make_config, run, stage, monkeypatch, tmp_path):
  """The real CPU training run and the planner (for the same 8 CPU devices) both get their step
  from ``train.jit_step``, and the two lower to the same program; for MLCM's stage 1 the
  training run trains stage 0 first and the planner's abstract previous LoRA stands in for it."""
  assert jax.device_count() == 8
  calls = _record_jit_step(monkeypatch, run_first=stage)
  with pytest.raises(_Stop):
    run(make_config(), str(tmp_path))
  assert len(calls) == stage + 1 and calls[stage].args is not None
  trained = calls[stage].lower(*calls[stage].args).as_text()
  step, args, _ = plan.build(make_config(), jax.devices(), stage=stage)
  assert len(calls) == stage + 2 and step is calls[stage + 1]
  assert step.lower(*args).as_text() == trained


@pytest.mark.slow  # builds the latent cache (cached), then lowers both steps (seconds)
@pytest.mark.parametrize("cached", [True, False], ids=["cached_latents", "vae_in_step"])
def test_train_and_plan_build_the_same_lcf_step(cached, tiny_sdxl_dir, monkeypatch, tmp_path):
  """LCF (configs/sdxl_lcf.py): the training run's step and the planner's lower to the same
  program, on latents read from the cache the run built, or with the VAE encoding the images in
  the step (the planner's VAE: its config, abstract parameters)."""
  from configs import sdxl_lcf  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  config = sdxl_lcf.get_config("tiny")
  config.student_unet = tiny_sdxl_dir
  config.images.update(dir=helpers.image_folder(tmp_path / "images"),
                       cache_dir=str(tmp_path / "latents") if cached else "")
  calls = _record_jit_step(monkeypatch)
  with pytest.raises(_Stop):
    sdxl_mlcm.run(config, str(tmp_path / "run"))
  trained = calls[0].lower(*calls[0].args).as_text()
  if cached:
    assert "latents" in calls[0].args[2] and "image" not in calls[0].args[2]
    assert "vae" not in calls[0].args[1]  # the VAE ran once, for the cache
  else:
    assert "image" in calls[0].args[2] and "vae" in calls[0].args[1]
  step, args, _ = plan.build(config, jax.devices(), stage=0)
  assert step.lower(*args).as_text() == trained


@pytest.mark.slow  # lowers a tiny MLCM step with the reward losses twice (seconds)
def test_train_and_plan_build_the_same_reward_step(tiny_sdxl_dir, tiny_imagereward, tiny_clip,
                                                   monkeypatch, tmp_path):
  """MLCM with reward consistency and feedback learning on ImageReward and the aesthetic score
  together (MLCM's pair): the training run's step and the planner's lower to the same program
  (the planner reads the scorers' files where they exist, as shapes); without the files it plans
  the published ImageReward v1.0 (BLIP ViT-L/16 + BERT-base, 35 prompt tokens) and the
  aesthetic predictor on CLIP ViT-L/14 with LAION's head."""
  config = sdxl_mlcm_config.get_config("tiny")
  config.student_unet = tiny_sdxl_dir  # the VAE decodes for the scorers
  config.rewards.update(scorer="imagereward+aesthetic", imagereward_dir=str(tiny_imagereward.dir),
                        clip_dir=str(tiny_clip.dir / "clip"), head=str(tiny_clip.dir / "head.pth"))
  calls = _record_jit_step(monkeypatch)
  with pytest.raises(_Stop):
    sdxl_mlcm.run(config, str(tmp_path / "run"))
  trained = calls[0].lower(*calls[0].args).as_text()
  assert set(calls[0].args[1]["scorer"]) == {"imagereward", "aesthetic"}
  assert "reward_ids" in calls[0].args[2]
  step, args, _ = plan.build(config, jax.devices(), stage=0)
  assert step.lower(*args).as_text() == trained
  count = lambda tree: sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
  config.rewards.update(imagereward_dir=str(tmp_path / "elsewhere"),  # not on this machine
                        clip_dir=str(tmp_path / "clip"))
  _, args, info = plan.build(config, jax.devices(), stage=0)
  assert info["report"]["scorers"] == {"imagereward": "published", "aesthetic": "published"}
  assert 440e6 < count(args[1]["scorer"]["imagereward"]) < 480e6  # ImageReward v1.0's size
  assert 300e6 < count(args[1]["scorer"]["aesthetic"]) < 310e6  # ViT-L/14 and the head
  assert args[2]["reward_ids"].shape[-2:] == (config.train.batch_size, 35)  # [accum, B, L]
  config.rewards.scorer = "aesthetic"
  _, args, _ = plan.build(config, jax.devices(), stage=0)
  assert 300e6 < count(args[1]["scorer"]) < 310e6 and "reward_ids" not in args[2]


def test_errors_name_the_value_and_what_is_allowed(monkeypatch):
  config = imagenet64_cd.get_config("tiny")
  with pytest.raises(errors.UserError, match=r"--topology='v9-8' is not known; allowed: v4-8"):
    plan.plan(config, "v9-8")
  devices = jax.devices()  # 8 CPU devices: the checks are the same for a TPU topology
  config.mesh.fsdp = 3
  with pytest.raises(ConfigError, match=r"config.mesh=\(data=-1, fsdp=3\) does not divide "
                     r"8 chips; allowed: data x fsdp = 8"):
    plan.build(config, devices, "8 chips")
  config.mesh.fsdp = 2
  config.train.batch_size = 12
  with pytest.raises(ConfigError, match=r"config.train.batch_size=12 is invalid .* a multiple "
                     "of 8"):
    plan.build(config, devices, "8 chips")
  with pytest.raises(ConfigError, match="config.experiment='toy' cannot be planned"):
    from configs import toy  # pylint: disable=g-import-not-at-top
    plan.plan(toy.get_config("tiny"), "local")
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  with pytest.raises(errors.UserError, match=r"pip install -e '\.\[tpu\]'"):
    topologies.topology_devices("v5e-8")


@needs_libtpu
@pytest.mark.parametrize("name,chips,kind", [("v4-8", 4, "TPU v4"), ("v5p-8", 4, "TPU v5"),
                                             ("v5e-64", 64, "TPU v5 lite"),
                                             ("v6e:2x4", 8, "TPU v6 lite")])
def test_topology_names(name, chips, kind):
  devices, _, hbm = topologies.topology_devices(name)
  assert len(devices) == chips and devices[0].device_kind == kind and hbm > 0
