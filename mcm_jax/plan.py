"""``--mode=plan``: will a config's train step fit on a TPU pod, and how much compute is one step?

The step that ``--mode=train`` runs (``train.jit_step`` of the experiment's loss, optimizer and
EMA, shardings from ``config.mesh`` by ``mcm_jax.sharding``'s rules, the state donated, remat and
dtype from the config) is lowered with abstract arguments (``jax.eval_shape``: nothing
allocated, no weights read) for the abstract devices of a TPU topology
(``jax.experimental.topologies`` through libtpu; no TPU needed) and compiled. The TPU
executable's ``memory_analysis()`` gives the bytes per chip (arguments, temporaries, outputs,
outputs aliased to donated arguments) and ``cost_analysis()`` the FLOPs per chip of one step.
``--topology=local`` compiles for the devices present (e.g. a GPU host) instead.

Pixel configs plan the step of their objective (base / CT / CD). MLCM configs plan progressive
stage ``--stage`` (default 0). Stage 0 reads the trajectory bank when ``mlcm.bank.dir`` is set,
else runs the guided teacher in the step; later stages run the previous stage's MLCM (the LoRA
it trained, here abstract) for the image-free latents and, with ``mlcm.teacher_mode='updated'``,
as the teacher.
Steps fused by ``train.fuse_steps`` (the toy) are planned one step at a time.
"""
import concurrent.futures
import json
import os
import re
import resource
import time

import jax
import numpy as np

from mcm_jax import experiments, flops, sharding, storage, topologies, train
from mcm_jax.config_validation import validate_batch_split
from mcm_jax.errors import ConfigError, UserError

GIB = topologies.GIB
FIT_FRACTION = 0.9  # fits: peak <= 90% of the chip's HBM (headroom for the runtime, fragments)


def without_remat(c):
  """A copy of config ``c`` whose network recomputes nothing in the backward pass (the
  experiment's ``REMAT_FIELD``: the UViT's ``model.remat``, the SDXL UNet's ``unet.remat``): the
  step whose FLOPs are the ideal ones."""
  c = c.copy_and_resolve_references()
  section, field = experiments.get(c.experiment).REMAT_FIELD.split(".")
  c[section][field] = "none"
  return c


def count(tree):
  """Number of array elements in ``tree``."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def build(c, devices, where="the devices", stage=0):
  """(jitted step, its abstract arguments (state, frozen, batches), info) of ``c``'s train step
  (of MLCM stage ``stage``) on ``devices``: ``train.jit_step`` of what ``train.train`` would
  make of the same inputs."""
  try:
    mesh = sharding.make_mesh(**c.mesh, devices=devices)
  except ValueError as e:
    n = len(devices)
    raise ConfigError(
        f"config.mesh=(data={c.mesh.data}, fsdp={c.mesh.fsdp}) does not divide {where}; allowed: "
        f"data x fsdp = {n} (-1: the rest), e.g. --config.mesh.fsdp="
        f"{'/'.join(str(d) for d in range(1, n + 1) if n % d == 0)}") from e
  validate_batch_split(c.train.batch_size, mesh.shape, where)
  trained = experiments.get(c.experiment).abstract_step(c, stage)
  tx = train.make_optimizer(c.train.optim)
  state = sharding.abstract(jax.eval_shape(lambda p: train.init_state(p, tx, c.train.seed),
                                           trained.params), mesh)
  frozen = sharding.abstract(trained.frozen, mesh)  # None stays None
  stacked = sharding.stacked_batch_sharding(mesh)
  batches = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype, sharding=stacked), trained.batch)
  step = train.jit_step(trained.loss, tx, c.train, state, frozen, mesh)
  info = dict(mesh=dict(mesh.shape), params=count(trained.model_params),
              trainable_params=count(trained.params), frozen_params=count(frozen),
              report=trained.report)
  one_batch = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
      trained.batch)
  info["forward"] = (jax.jit(trained.forward), (state.params, frozen, one_batch))
  return step, (state, frozen, batches), info


def program_flops(f, args, chips):
  """FLOPs per chip of ``f(*args)`` split over ``chips`` chips: ``jaxpr_flops`` of its trace
  (matmuls and convolutions, loops counted in full)."""
  return flops.jaxpr_flops(jax.make_jaxpr(f)(*args)) / chips


def reference_flops(c, devices, forward, where="the devices", stage=0):
  """(FLOPs per chip of one student forward, of the step without rematerialisation): the units
  of a plan's ``flops_ratio`` and its ideal. ``forward``: ``build``'s ``info['forward']``."""
  ideal_step, ideal_args, _ = build(without_remat(c), devices, where, stage)
  return (program_flops(*forward, len(devices)),
          program_flops(ideal_step, ideal_args, len(devices)))


def compile_step(c, devices, where="the devices", stage=0):
  """(compiled executable, or None when the TPU compiler finds it cannot fit the chip's HBM
  (``info['compile_error']``), its abstract arguments, info with ``compile_s`` and the program's
  FLOPs per chip (``jaxpr_flops``) of the step, ``program_flops``, of the same step without
  rematerialisation, ``ideal_flops``, and of one student forward, ``forward_flops``) of
  ``build``. The two reference programs are only traced, on a second thread while the compiler
  (which releases the GIL) works: for SDXL that hides ~25 s of tracing in a 29-minute compile."""
  step, args, info = build(c, devices, where, stage)
  forward = info.pop("forward")
  t0 = time.time()
  traced = step.trace(*args)  # its jaxpr is counted below: the step is traced once
  lowered = traced.lower()
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    references = pool.submit(reference_flops, c, devices, forward, where, stage)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler's "does not fit" is an answer
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      compiled, info["compile_error"] = None, str(e).strip().splitlines()[0]
      info["argument_bytes"] = sum(  # each chip's shards, before any layout padding
          flops.size(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
          for x in jax.tree_util.tree_leaves(args))
    compile_s = time.time() - t0
    forward_flops, ideal_flops = references.result()
  return compiled, args, dict(info, compile_s=compile_s,
                              program_flops=flops.jaxpr_flops(traced.jaxpr) / len(devices),
                              forward_flops=forward_flops, ideal_flops=ideal_flops)


def _exhausted_temp_bytes(message):
  """Bytes of temporaries the TPU compiler names in its out-of-memory error ('... HLO
  temporaries (26.79G) exceeds available HBM (15.75G)'), None if it names none."""
  m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
  return None if m is None else float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10)


def summarize(c, topology, devices, spec, hbm, compiled, info, stage=0):
  """The plan's JSON-able dict: XLA's memory per chip (GiB), FLOPs per chip, ``fits``. When
  the compiler refused the step (``compiled`` None), ``fits`` is False, ``compile_error`` its
  message, the temporaries it named and the arguments counted by hand (unpadded shards)."""
  gib = lambda b: None if b is None else round(b / GIB, 4)
  if compiled is None:
    sizes = dict(argument=info["argument_bytes"], temp=_exhausted_temp_bytes(
        info["compile_error"]), output=None, alias=None)
  else:
    mem = compiled.memory_analysis()
    sizes = dict(argument=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
                 output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes)
  r = dict(topology=topology, libtpu_topology=spec, device_kind=devices[0].device_kind,
           chips=len(devices), mesh=info["mesh"], global_batch=c.train.batch_size,
           batch_per_chip=c.train.batch_size / len(devices), params=info["params"],
           trainable_params=info["trainable_params"], frozen_params=info["frozen_params"],
           hbm_capacity_gib_per_chip=None if hbm is None else round(hbm, 4))
  r.update({f"{k}_gib_per_chip": gib(v) for k, v in sizes.items()})
  if compiled is None:
    r.update(peak_gib_per_chip=None, fits=False, compile_error=info["compile_error"])
  else:
    r["peak_gib_per_chip"] = gib(sizes["argument"] + sizes["temp"] + sizes["output"]
                                 - sizes["alias"])
    r["fits"] = None if hbm is None else bool(
        r["peak_gib_per_chip"] <= FIT_FRACTION * r["hbm_capacity_gib_per_chip"])
  # XLA's count runs a loop body once (jaxpr_flops counts scans in full)
  r["flops_per_step_per_chip"] = None if compiled is None else flops.compiled_flops(compiled)
  r["program_flops_per_step_per_chip"] = info["program_flops"]  # matmuls / convs, loops unrolled
  r["forward_flops_per_chip"] = info["forward_flops"]
  r["flops_ratio"] = round(info["program_flops"] / info["forward_flops"], 3)
  r["ideal_ratio"] = round(info["ideal_flops"] / info["forward_flops"], 3)  # none recomputed
  r["compile_s"] = round(info["compile_s"], 1)
  r["host_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
  r.update(info["report"])  # the experiment's own fields (MLCM: stage, from_bank, scorers)
  return r


def check_stage(c, stage):
  """Raises UserError unless ``stage`` is a stage of config ``c``: 0 .. the experiment's
  ``num_stages`` - 1 (1 for pixel configs, ``mlcm.num_stages`` for MLCM)."""
  stages = experiments.get(c.experiment).num_stages(c)
  if not 0 <= stage < stages:
    what = (f"config.mlcm.num_stages={stages}" if c.experiment == "mlcm"
            else f"config.experiment={c.experiment!r} trains one step")
    raise UserError(f"--stage={stage} is not a stage of this config ({what}); allowed: "
                    + ", ".join(str(i) for i in range(stages)))


def plan(c, topology, stage=0):
  """The plan of config ``c``'s train step (of MLCM stage ``stage``) on ``topology`` (see
  ``topology_devices``) as a JSON-able dict."""
  if not experiments.trains_one_step(c.experiment):
    planned = [name for name in experiments.MODULES if experiments.trains_one_step(name)]
    raise ConfigError(f"config.experiment={c.experiment!r} cannot be planned (the toy trains many "
                      f"small models in one process); allowed: {' or '.join(planned)} configs")
  check_stage(c, stage)
  devices, spec, hbm = topologies.topology_devices(topology)
  compiled, _, info = compile_step(c, devices, f"--topology={topology} ({len(devices)} chips)",
                                   stage)
  return summarize(c, topology, devices, spec, hbm, compiled, info, stage)


def advice(report, c):
  """What would make a plan that does not fit fit: the larger of arguments / temporaries and
  the settings that shrink it."""
  r = dict(report)
  chips, fsdp = r["chips"], r["mesh"]["fsdp"]
  for key in ("argument_gib_per_chip", "temp_gib_per_chip"):  # unknown when compiling failed
    r[key] = r[key] or 0.0
  args, cap = r["argument_gib_per_chip"], r["hbm_capacity_gib_per_chip"]
  if args >= r["temp_gib_per_chip"] or (cap and args > FIT_FRACTION * cap):
    what = "alone exceed the chip's HBM" if cap and args > cap else "dominate"
    hint = (f"arguments {what} ({args:.2f} GiB per chip: parameters, EMA, Adam moments and "
            "frozen weights): ")
    if fsdp < chips:
      return hint + (f"shard them over more chips with config.mesh.fsdp (now {fsdp}; e.g. "
                     f"--config.mesh.fsdp={chips} --config.mesh.data=1)")
    return hint + "they are sharded over every chip already: a topology with more chips or HBM"
  hints = [f"lower the batch per chip (now {r['batch_per_chip']:g}: e.g. "
           f"--config.train.batch_size={max(c.train.batch_size // 2, r['chips'])})"]
  field = experiments.get(c.experiment).REMAT_FIELD
  section, name = field.split(".")
  if c[section][name] != "full":
    hints.insert(0, f"rematerialise more of the blocks (--config.{field}=full)")
  if r.get("from_bank") is False and not r["stage"]:  # MLCM stage 0 with the teacher inside
    hints.append("take the teacher out of the step with a trajectory bank "
                 "(--config.mlcm.bank.dir=DIR)")
  if fsdp < chips:
    hints.append(f"shard parameters with config.mesh.fsdp (now {fsdp})")
  return (f"temporaries dominate ({r['temp_gib_per_chip']:.2f} GiB per chip, activations): "
          + "; ".join(hints))


def table(report):
  """The plan as readable lines."""
  r = report
  cap = r["hbm_capacity_gib_per_chip"]
  lines = [f"plan on {r['topology']} ({r['chips']} x {r['device_kind']}, mesh data="
           f"{r['mesh']['data']} x fsdp={r['mesh']['fsdp']}), global batch {r['global_batch']} "
           f"({r['batch_per_chip']:g} per chip)"
           + ("" if "stage" not in r else f", MLCM stage {r['stage']}"
              + (" from the trajectory bank" if r["from_bank"] else "")),
           f"  parameters {r['params']:,} (trainable {r['trainable_params']:,}, frozen inputs "
           f"{r['frozen_params']:,})",
           "  per chip               GiB"]
  if r.get("scorers"):  # MLCM's reward losses: each scorer from its files or at its published size
    lines.insert(2, "  reward scorers: " + ", ".join(
        f"{name} ({'its files' if how == 'files' else 'published architecture'})"
        for name, how in r["scorers"].items()))
  for key, label in (("argument", "arguments"), ("temp", "temporaries"), ("output", "outputs"),
                     ("alias", "- aliased (donated)")):
    value = r[key + "_gib_per_chip"]
    lines.append(f"  {label:<20} " + ("      n/a" if value is None else f"{value:9.3f}"))
  if r["peak_gib_per_chip"] is None:
    lines.append(f"  does NOT fit: the TPU compiler refused the step ({r['compile_error']})")
  else:
    peak = f"  {'peak':<20} {r['peak_gib_per_chip']:9.3f}"
    if cap is not None:
      peak += (f" of {cap:g} GiB HBM ({100 * r['peak_gib_per_chip'] / cap:.0f}%): "
               f"{'fits' if r['fits'] else 'does NOT fit'} (limit {100 * FIT_FRACTION:.0f}%)")
    lines.append(peak)
  if r["flops_per_step_per_chip"] is not None:
    lines.append(f"  FLOPs per step: {r['flops_per_step_per_chip'] / 1e12:.4g} T per chip, "
                 f"{r['flops_per_step_per_chip'] * r['chips'] / 1e12:.4g} T in all")
  lines.append(f"  program (matmuls and convolutions, scans unrolled): "
               f"{r['program_flops_per_step_per_chip'] / 1e12:.4g} T per chip = "
               f"{r['flops_ratio']:.3g} student forwards; without remat {r['ideal_ratio']:.3g} "
               f"({r['flops_ratio'] / r['ideal_ratio']:.3f}x)")
  lines.append(f"  compile {r['compile_s']:.1f} s, host peak memory {r['host_peak_gib']:.2f} GiB")
  return "\n".join(lines)


def run(config, topology, workdir=None, stage=0):
  """``--mode=plan``: prints the table, advice when it does not fit, and the JSON line last;
  with ``workdir``, also writes it to ``workdir/plan_<topology>[_stage<i>].json`` (MLCM stage
  ``stage`` > 0 adds the suffix). Returns the report."""
  if not topology:
    raise UserError(f"--mode=plan needs --topology; allowed: {', '.join(topologies.TOPOLOGIES)}, a libtpu "
                    "spelling such as v5e:8x8, or local")
  report = plan(config, topology, stage)
  print(table(report))
  if report["fits"] is False:
    print("  to fit: " + advice(report, config))
  if workdir:
    storage.makedirs(workdir)
    name = topology.replace(":", "_") + (f"_stage{stage}" if stage else "")
    storage.write_json(os.path.join(workdir, f"plan_{name}.json"), report)
  print(json.dumps(report), flush=True)
  return report
