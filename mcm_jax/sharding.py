"""Device mesh and the rules that map parameter / batch shapes to NamedShardings (one place).

Axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallel + parameters sharded).
The batch is split over both axes; a parameter (and its EMA / optimizer moments, which have its
shape) is split over ``fsdp`` along its largest dimension divisible by the fsdp size, if it has
at least ``min_fsdp_size`` elements and is neither a convolution kernel nor a low-rank factor
(``LOW_RANK_FACTORS``); everything else is replicated. Steps are ``jax.jit`` with
these shardings (GSPMD), so the same code runs on 1 device, a GPU node or a TPU pod.
"""
import contextlib

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mcm_jax.errors import UserError

MESH_AXES = ("data", "fsdp")
# Leaf names of low-rank factors (``mcm_jax.lora``: ``{'a': [..., in, r], 'b': [..., r, out]}``),
# replicated: ``y + (x a) b`` with ``b`` split by output feature makes GSPMD split the
# activations it is added to by feature and gather their batch on every chip (the whole UNet's
# activations at full batch). Replicated, the factors are data parallel like their inputs.
LOW_RANK_FACTORS = ("a", "b")


def make_mesh(data=-1, fsdp=1, devices=None):
  """A ``data x fsdp`` mesh over ``devices`` (default: all); -1 takes the remaining devices.

  Axes are ``Auto`` (classic GSPMD: jit + NamedSharding + sharding constraints).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  if data == -1 and fsdp == -1:
    raise UserError("mesh: at most one of data / fsdp may be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise UserError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices; "
                    f"allowed: positive sizes whose product is {n} (-1 for 'the rest')")
  return Mesh(devices.reshape(data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(MESH_AXES))


def is_conv_kernel(shape):
  """A 2-D convolution kernel ``[kh, kw, in, out]`` (kh, kw <= 7), not a DenseGeneral kernel
  such as ``[in, 3, heads, head_dim]``."""
  return len(shape) == 4 and shape[0] <= 7 and shape[1] <= 7


def param_spec(shape, fsdp_size, min_fsdp_size=2 ** 14):
  """PartitionSpec of one parameter: its largest fsdp-divisible dimension on ``fsdp``.

  Convolution kernels (``[kh, kw, in, out]``, a window of at most 7 x 7) stay replicated. Given
  a sharded kernel, GSPMD splits the convolution by output channels over the whole gathered
  batch, and the TPU compiler spends most of an SDXL step's compile on those convolutions (4
  convolutions of 640 channels at 64 x 64 on v6e-8: 91.5 s sharded, 18.9 s replicated).
  Replicated, SDXL's kernels are 0.55 GiB of bf16 per chip; the UViTs' ResBlock kernels cost
  UViT-large CD64 (fsdp 16 on v5e-256) 0.66 GiB more arguments per chip (parameters, EMA, Adam
  moments, teacher).
  """
  if (fsdp_size == 1 or is_conv_kernel(shape)
      or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size):
    return P()
  candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp_size == 0]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[candidates[0]] = "fsdp"
  return P(*spec)


def _is_low_rank_factor(path):
  last = path[-1] if path else None
  return getattr(last, "key", getattr(last, "name", None)) in LOW_RANK_FACTORS


def tree_shardings(tree, mesh, min_fsdp_size=2 ** 14):
  """NamedShardings for every array leaf of ``tree`` (params, EMA, optimizer state, scalars):
  ``param_spec`` of its shape, replicated for a low-rank factor (a leaf named in
  ``LOW_RANK_FACTORS``, also inside optimizer states, which keep the parameters' paths)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, P() if _is_low_rank_factor(path) else param_spec(
          np.shape(x), fsdp, min_fsdp_size)), tree)


def tracing_on(mesh):
  """A context for tracing a jitted function's body: ``constrain_batch`` within it splits over
  ``mesh`` (``jax.sharding.use_abstract_mesh``); with ``mesh`` None it does nothing."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_batch(x, axis=0):
  """``x`` with dimension ``axis`` (its batch) split over every device of the mesh the step is
  traced on (``tracing_on``: the train step, the trajectory bank's builder), like the batch.
  For values a step makes from no input, such as noise: left unconstrained, GSPMD may replicate
  them and with them every activation computed from them (then split by feature, the batch
  gathered on every chip). Outside such a mesh ``x`` is returned as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = [None] * x.ndim
  spec[axis] = MESH_AXES
  return jax.lax.with_sharding_constraint(x, P(*spec))


def stacked_batch_sharding(mesh):
  """[steps, batch, ...]: the batch dimension (axis 1) split over every device."""
  return NamedSharding(mesh, P(None, MESH_AXES))


def shard_batch(batch, mesh, stacked=False):
  """Places a host batch (this process's slice of the global batch) on the mesh; ``stacked``:
  the arrays are [steps, batch, ...] (several steps' batches for one fused call).

  On one host this is a ``device_put``; with several hosts every process passes its own slice
  and ``make_array_from_process_local_data`` assembles the global array.
  """
  target = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, target)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(target, np.asarray(x)), batch)


def put(tree, shardings):
  """``jax.device_put(tree, shardings)`` for values that every process holds alike (parameters,
  optimizer state, frozen inputs, seeded noise); ``shardings`` a tree like it or one sharding
  for every leaf. With several processes each builds its own
  shards from its copy (``jax.make_array_from_callback``): ``device_put`` would first check that
  the processes agree, one all-gather across them per leaf. Arrays already spread over the
  processes (restored checkpoints) are resharded by ``device_put``."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):  # one for every leaf
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

  def one(x, target):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, target)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  return jax.tree_util.tree_map(one, tree, shardings)


def abstract_params(init_fn, inputs, mesh=None, seed=0):
  """ShapeDtypeStructs of ``init_fn(rng, *inputs)``'s parameters (nothing allocated), with the
  rules' shardings over ``mesh`` if given."""
  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(seed), *inputs)
  return shapes if mesh is None else abstract(shapes, mesh)


def abstract(tree, mesh, min_fsdp_size=2 ** 14):
  """ShapeDtypeStructs of ``tree``'s leaves (arrays or shapes) with the rules' shardings over
  ``mesh``: what ``jax.device_put(tree, tree_shardings(tree, mesh))`` gives, nothing allocated."""
  as_struct = lambda x, sh: jax.ShapeDtypeStruct(  # numpy's float64 is float32 on device
      np.shape(x), jax.dtypes.canonicalize_dtype(x.dtype), sharding=sh)
  return jax.tree_util.tree_map(as_struct, tree, tree_shardings(tree, mesh, min_fsdp_size))
