"""LoRA for the SDXL UNet's Dense kernels (and, imported from files, convolution kernels), as a
separate pytree applied unmerged beside the frozen parameters.

``y = x W + scale * (x A) B`` with ``A [in, r]``, ``B [r, out]`` (B starts at zero, so the
adapted model starts equal to the base); for a convolution kernel ``[kh, kw, in, out]``, ``A``
is ``[kh, kw, in, r]`` (a convolution to rank ``r``). The LoRA tree is keyed by diffusers'
module paths, ``{'down_blocks_1/.../transformer_blocks_0/attn1/to_q': {'a', 'b'}}``: only it is
trained, checkpointed and exported. ``attach(base, lora, scale)`` is pure and differentiable:
the student is the UNet applied to ``attach(base, lora)`` (``models.sdxl_unet.Adapted``), the
low-rank term computed in float32 (``sdxl_unet``), so it survives bfloat16 base weights.

Export writes the PEFT layout that diffusers' ``load_lora_weights`` reads for SDXL
(``pytorch_lora_weights.safetensors``) and the kohya layout that ComfyUI, AUTOMATIC1111 and
kohya sd-scripts read (``<name>_kohya.safetensors``), the scale folded into B; import reads
those (kohya also with the original SDXL module names) and diffusers' older layout
(``mcm_jax.lora_formats``). A file that is unreadable, in another layout or does not fit the
UNet (another rank per module, other targets, another architecture) is an error naming the
file, the module and the shapes.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mcm_jax import lora_formats, storage
from mcm_jax.errors import UserError
from mcm_jax.models import sdxl_unet

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")  # the UNet's attention projections
LORA_FILE = "pytorch_lora_weights.safetensors"


def target_paths(params, targets=DEFAULT_TARGETS):
  """diffusers' '/'-joined paths of the Dense modules named in ``targets`` (their 'kernel' is
  adapted) in the UNet ``params``."""
  dense = [p for p, shape in sdxl_unet.kernel_shapes(params).items() if len(shape) == 2]
  paths = sorted(p for p in dense if p.rsplit("/", 1)[-1] in targets)
  if not paths:
    raise UserError(f"LoRA targets {tuple(targets)} name no Dense kernel of these parameters; "
                    f"Dense modules here: {sorted({p.rsplit('/', 1)[-1] for p in dense})[:20]}")
  return paths


def init_lora(params, rank, rng, targets=DEFAULT_TARGETS):
  """A: N(0, 1/in), B: 0 for every target kernel [in, out]."""
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise UserError(f"LoRA rank={rank!r} is invalid; allowed: an integer >= 1")
  shapes = sdxl_unet.kernel_shapes(params)
  lora = {}
  for i, path in enumerate(target_paths(params, targets)):
    d_in, d_out = shapes[path]
    a = jax.random.normal(jax.random.fold_in(rng, i), (d_in, rank)) / np.sqrt(d_in)
    lora[path] = {"a": a, "b": jnp.zeros((rank, d_out))}
  return lora


def check_fits(params, lora, source="LoRA"):
  """A UserError naming ``source`` (e.g. the file), the first module that is not a kernel of
  ``params`` or whose ``a`` / ``b [r, out]`` do not fit its kernel (``a`` is the kernel's shape
  with ``out`` replaced by ``r``), and the shapes."""
  shapes = sdxl_unet.kernel_shapes(params)
  for path in sorted(lora):
    a_shape, b_shape = tuple(np.shape(lora[path]["a"])), tuple(np.shape(lora[path]["b"]))
    name = lora_formats.torch_module_name(path)
    if path not in shapes:
      raise UserError(f"{source}: module {name!r} is not a Dense layer or a convolution of this "
                      "UNet (a LoRA for another architecture?)")
    kernel = shapes[path]
    if len(b_shape) != 2 or a_shape[-1:] != b_shape[:1] or a_shape[:-1] + b_shape[1:] != kernel:
      raise UserError(f"{source}: module {name!r} has a {a_shape} and b {b_shape} (as [in, rank] "
                      f"or [kh, kw, in, rank], and [rank, out]), which do not fit this UNet's "
                      f"kernel {kernel} ([in, out] or [kh, kw, in, out]; a LoRA for another "
                      "architecture?)")


def attach(params, lora, scale=1.0, source="LoRA"):
  """``sdxl_unet.Adapted(params, factors)``: the UNet ``params`` (scanned layout) with ``lora``
  to apply unmerged at ``scale`` (pure; gradients flow to ``lora``). Shapes are checked first
  (``check_fits``; errors name ``source``). In a scanned stack, blocks without a factor get
  zeros and factors of lower rank are zero-padded (both exact)."""
  check_fits(params, lora, source)
  places = sdxl_unet.layout(params)
  flat, stacks = {}, {}
  for path, ab in lora.items():
    skey, index, _ = places[tuple(path.split("/")) + ("kernel",)]
    a = ab["a"].astype(jnp.float32)
    b = scale * ab["b"].astype(jnp.float32)
    if index is None:
      flat[skey[:-1]] = {"a": a, "b": b}
    else:
      stacks.setdefault(skey, {})[index] = (a, b)
  shapes = flatten_dict(params)
  for skey, blocks in stacks.items():
    depth, rank = np.shape(shapes[skey])[0], max(a.shape[-1] for a, _ in blocks.values())
    some_a, some_b = next(iter(blocks.values()))
    pad = lambda x, axis: jnp.pad(x, [(0, rank - x.shape[axis]) if d == axis % x.ndim else (0, 0)
                                      for d in range(x.ndim)])
    a = [pad(blocks[i][0], -1) if i in blocks else jnp.zeros(some_a.shape[:-1] + (rank,))
         for i in range(depth)]
    b = [pad(blocks[i][1], 0) if i in blocks else jnp.zeros((rank,) + some_b.shape[1:])
         for i in range(depth)]
    flat[skey[:-1]] = {"a": jnp.stack(a), "b": jnp.stack(b)}
  factors = unflatten_dict({m + (k,): v for m, ab in flat.items() for k, v in ab.items()})
  return sdxl_unet.Adapted(params, factors)


def combine(loras_and_scales):
  """Several LoRAs as one: ``sum_i s_i A_i B_i = [A_1 ... A_n] [s_1 B_1; ...; s_n B_n]`` per module
  (ranks concatenated; a module in only some of the LoRAs gets only theirs). Exact, so stacked
  LoRAs (an MLCM LoRA and a style LoRA) attach at scale 1."""
  out = {}
  for lora, scale in loras_and_scales:
    for path, ab in lora.items():
      a, b = jnp.asarray(ab["a"], jnp.float32), scale * jnp.asarray(ab["b"], jnp.float32)
      if path in out:
        a = jnp.concatenate([out[path]["a"], a], -1)
        b = jnp.concatenate([out[path]["b"], b], 0)
      out[path] = {"a": a, "b": b}
  return out


def save(directory, lora, scale=1.0, kohya_name="lora", kohya_dtype="float16"):
  """Writes ``directory/pytorch_lora_weights.safetensors`` (diffusers' PEFT layout, float32) and
  ``directory/<kohya_name>_kohya.safetensors`` (ComfyUI / A1111 / kohya, ``kohya_dtype``);
  returns the first path."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  storage.makedirs(directory)
  lora = jax.device_get(lora)
  path = os.path.join(directory, LORA_FILE)
  storage.write_bytes(path, save(lora_formats.to_peft(lora, scale)))
  storage.write_bytes(os.path.join(directory, f"{kohya_name}_kohya.safetensors"),
                      save(lora_formats.to_kohya(lora, scale, np.dtype(kohya_dtype))))
  return path


def read(path):
  """``lora_formats.module_parts`` of a LoRA ``.safetensors`` file (or a directory holding
  ``LORA_FILE``): the layout and the per-module matrices, checked without the UNet; errors name
  the file."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  if storage.isdir(path):
    path = os.path.join(path, LORA_FILE)
  if not storage.isfile(path):
    raise FileNotFoundError(f"LoRA file {path!r} not found (a .safetensors file, or a directory "
                            f"holding {LORA_FILE})")
  try:
    state_dict = load(storage.read_bytes(path))
  except SafetensorError as e:
    raise UserError(f"LoRA file {path} is not a readable safetensors file (truncated or corrupt: "
                    f"{e}); export it again") from e
  return lora_formats.module_parts(state_dict, source=f"LoRA file {path}")


def load(path, params, parsed=None):
  """The LoRA tree (scale folded in) from a file in any layout of ``lora_formats.LAYOUTS`` (PEFT,
  diffusers' older layout, kohya), checked against the UNet ``params``; errors name the file.
  ``parsed``: the file's ``read`` if already done (the file is parsed once)."""
  source = f"LoRA file {path}"
  layout, parts = read(path) if parsed is None else parsed
  lora = lora_formats.to_tree(layout, parts, params, source=source)
  check_fits(params, lora, source)
  return lora
