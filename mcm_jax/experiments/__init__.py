"""The experiments ``main`` dispatches to (``config.experiment`` -> ``MODULES``): each only
orchestrates (build -> train / evaluate -> report); the math is in the pure modules and
``objectives`` maps configs onto it.

Every experiment module has ``run(config, workdir)``. Those that train one step per stage
(pixel, mlcm) also have ``num_stages(config)``, ``REMAT_FIELD`` (the config field of the
network's rematerialisation policy) and ``abstract_step(config, stage) -> Step``: the step
``run`` trains, built by the same function ``run`` uses, on parameter shapes instead of arrays
(what ``--mode=plan`` compiles and the benchmarks time). Pixel also has ``evaluate``.
"""
import dataclasses
import importlib
from typing import Any, Callable

MODULES = {"toy": "toy", "pixel": "pixel", "mlcm": "sdxl_mlcm"}


def get(name):
  """The module of experiment ``name`` (a key of ``MODULES``), imported on first use."""
  return importlib.import_module(f"{__name__}.{MODULES[name]}")


def trains_one_step(name):
  """Whether experiment ``name`` trains one step per stage (and can be planned)."""
  return hasattr(get(name), "abstract_step")


@dataclasses.dataclass(frozen=True)
class Step:
  """One experiment's training step, as ``train.train`` runs it.

  loss: ``loss(params, batch, rng, step, frozen) -> (loss, metrics)``.
  params: the trained tree (arrays, or ShapeDtypeStructs in ``abstract_step``).
  frozen: the step's inputs that are not trained (teacher weights, conditioning), or None.
  batch: ShapeDtypeStructs of one global batch.
  model_params: the whole network's parameters (a LoRA's base included), as counted in plans.
  forward: ``forward(params, frozen, batch)``, one student forward: the unit of a plan's FLOPs.
  report: fields a plan of this step adds to its report (e.g. MLCM's stage).
  """
  loss: Callable[..., Any]
  params: Any
  frozen: Any
  batch: Any
  model_params: Any
  forward: Callable[..., Any]
  report: dict = dataclasses.field(default_factory=dict)
