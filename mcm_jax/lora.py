"""LoRA for Flax Dense kernels (and, imported from files, convolution kernels), as a separate
pytree merged into the frozen parameters.

``W' = W + scale * A @ B`` with ``A [in, r]``, ``B [r, out]`` (B starts at zero, so the merged
model starts equal to the base); for a convolution kernel ``[kh, kw, in, out]``, ``A`` is
``[kh, kw, in, r]`` and the product is over the rank axis. The LoRA tree is
``{'down_blocks_1/.../attn1/to_q': {'a', 'b'}}``: only it is trained and checkpointed; ``merge``
is a pure, differentiable function, so the student forward is ``apply(merge(base, lora), ...)``
with no change to the network module.

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

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")  # the UNet's attention projections
LORA_FILE = "pytorch_lora_weights.safetensors"


def target_paths(params, targets=DEFAULT_TARGETS):
  """'/'-joined paths of the Dense modules named in ``targets`` (their 'kernel' is adapted)."""
  dense = {k: v for k, v in flatten_dict(params).items()
           if k[-1] == "kernel" and len(k) > 1 and len(np.shape(v)) == 2}
  paths = sorted("/".join(k[:-1]) for k in dense if k[-2] in targets)
  if not paths:
    raise UserError(f"LoRA targets {tuple(targets)} name no Dense kernel of these parameters; "
                    f"Dense modules here: {sorted({k[-2] for k in dense})[:20]}")
  return paths


def init_lora(params, rank, rng, targets=DEFAULT_TARGETS):
  """A: N(0, 1/in), B: 0 for every target kernel [in, out]."""
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise UserError(f"LoRA rank={rank!r} is invalid; allowed: an integer >= 1")
  flat = flatten_dict(params)
  lora = {}
  for i, path in enumerate(target_paths(params, targets)):
    d_in, d_out = flat[tuple(path.split("/")) + ("kernel",)].shape
    a = jax.random.normal(jax.random.fold_in(rng, i), (d_in, rank)) / np.sqrt(d_in)
    lora[path] = {"a": a, "b": jnp.zeros((rank, d_out))}
  return lora


def check_fits(params, lora, source="LoRA"):
  """A UserError naming ``source`` (e.g. the file), the first module that is not a kernel of
  ``params`` or whose ``a`` / ``b [r, out]`` do not fit its kernel (``a`` is the kernel's shape
  with ``out`` replaced by ``r``), and the shapes."""
  flat = flatten_dict(params)
  for path in sorted(lora):
    a_shape, b_shape = tuple(np.shape(lora[path]["a"])), tuple(np.shape(lora[path]["b"]))
    name = lora_formats.torch_module_name(path)
    key = tuple(path.split("/")) + ("kernel",)
    if key not in flat:
      raise UserError(f"{source}: module {name!r} is not a Dense layer or a convolution of this "
                      "UNet (a LoRA for another architecture?)")
    kernel = tuple(np.shape(flat[key]))
    if len(b_shape) != 2 or a_shape[-1:] != b_shape[:1] or a_shape[:-1] + b_shape[1:] != kernel:
      raise UserError(f"{source}: module {name!r} has a {a_shape} and b {b_shape} (as [in, rank] "
                      f"or [kh, kw, in, rank], and [rank, out]), which do not fit this UNet's "
                      f"kernel {kernel} ([in, out] or [kh, kw, in, out]; a LoRA for another "
                      "architecture?)")


def merge(params, lora, scale=1.0, source="LoRA"):
  """params with ``kernel += scale * a @ b`` (over the rank axis: ``a`` may be a convolution's
  ``[kh, kw, in, r]``) at every LoRA path (pure; grads flow to lora). Shapes are checked first
  (``check_fits``; errors name ``source``)."""
  check_fits(params, lora, source)
  flat = dict(flatten_dict(params))
  for path, ab in lora.items():
    key = tuple(path.split("/")) + ("kernel",)
    kernel = flat[key]
    a = ab["a"].astype(jnp.float32)
    delta = scale * (a.reshape(-1, a.shape[-1]) @ ab["b"].astype(jnp.float32)).reshape(
        kernel.shape)
    flat[key] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return unflatten_dict(flat)


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
