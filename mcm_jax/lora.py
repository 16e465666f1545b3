"""LoRA for Flax Dense kernels, as a separate pytree merged into the frozen parameters.

``W' = W + scale * A @ B`` with ``A [in, r]``, ``B [r, out]`` (B starts at zero, so the merged
model starts equal to the base). The LoRA tree is ``{'down_blocks_1/.../attn1/to_q': {'a', 'b'}}``:
only it is trained and checkpointed; ``merge`` is a pure, differentiable function, so the
student forward is ``apply(merge(base, lora), ...)`` with no change to the network module.

Export / import use the PEFT key layout that diffusers' ``load_lora_weights`` reads for SDXL
(``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight [r, in]``,
``...lora_B.weight [out, r]``), in a ``pytorch_lora_weights.safetensors`` file; the scale is
folded into B, so the file needs no alpha.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")  # the UNet's attention projections
LORA_FILE = "pytorch_lora_weights.safetensors"


def target_paths(params, targets=DEFAULT_TARGETS):
  """'/'-joined paths of the Dense modules named in ``targets`` (their 'kernel' is adapted)."""
  paths = sorted("/".join(k[:-1]) for k, v in flatten_dict(params).items()
                 if k[-1] == "kernel" and k[-2] in targets and len(np.shape(v)) == 2)
  if not paths:
    raise ValueError(f"no Dense kernels named {targets} in these parameters")
  return paths


def init_lora(params, rank, rng, targets=DEFAULT_TARGETS):
  """A: N(0, 1/in), B: 0 for every target kernel [in, out]."""
  flat = flatten_dict(params)
  lora = {}
  for i, path in enumerate(target_paths(params, targets)):
    d_in, d_out = flat[tuple(path.split("/")) + ("kernel",)].shape
    a = jax.random.normal(jax.random.fold_in(rng, i), (d_in, rank)) / np.sqrt(d_in)
    lora[path] = {"a": a, "b": jnp.zeros((rank, d_out))}
  return lora


def merge(params, lora, scale=1.0):
  """params with ``kernel += scale * a @ b`` at every LoRA path (pure; grads flow to lora)."""
  flat = dict(flatten_dict(params))
  for path, ab in lora.items():
    key = tuple(path.split("/")) + ("kernel",)
    if key not in flat:
      raise ValueError(f"LoRA target {path!r} is not a Dense kernel of these parameters")
    kernel = flat[key]
    delta = scale * (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32))
    flat[key] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return unflatten_dict(flat)


def _torch_module_name(path):
  """'down_blocks_1/attentions_0/.../to_out_0' -> 'down_blocks.1.attentions.0....to_out.0'."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", seg) for seg in path.split("/"))


def _flax_path(name):
  """Inverse of ``_torch_module_name``."""
  return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", "/")


def to_diffusers(lora, scale=1.0, prefix="unet"):
  """{PEFT key: float32 numpy array} for diffusers (scale folded into lora_B)."""
  out = {}
  for path, ab in lora.items():
    name = f"{prefix}.{_torch_module_name(path)}"
    out[f"{name}.lora_A.weight"] = np.asarray(ab["a"], np.float32).T.copy()
    out[f"{name}.lora_B.weight"] = (scale * np.asarray(ab["b"], np.float32)).T.copy()
  return out


def from_diffusers(state_dict, prefix="unet"):
  """The LoRA tree (scale 1) from a PEFT-layout state dict; other modules' keys (text encoders)
  are ignored, other layouts (e.g. kohya 'lora_unet_*') are an error."""
  lora = {}
  pattern = re.compile(rf"^{re.escape(prefix)}\.(.+)\.lora_([AB])\.weight$")
  for key, value in state_dict.items():
    m = pattern.match(key)
    if m is None:
      if key.startswith(f"{prefix}.") or key.startswith(f"lora_{prefix}_"):
        raise ValueError(f"LoRA key {key!r} is not in the PEFT layout "
                         f"'{prefix}.<module>.lora_A|B.weight'")
      continue
    entry = lora.setdefault(_flax_path(m.group(1)), {})
    entry["a" if m.group(2) == "A" else "b"] = jnp.asarray(np.asarray(value, np.float32).T)
  incomplete = [p for p, ab in lora.items() if set(ab) != {"a", "b"}]
  if incomplete or not lora:
    raise ValueError(f"LoRA state dict has no complete {prefix} adapters (incomplete: "
                     f"{incomplete[:3]})")
  return lora


def save(directory, lora, scale=1.0):
  """Writes ``directory/pytorch_lora_weights.safetensors`` (diffusers' default LoRA name)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, LORA_FILE)
  save_file(to_diffusers(jax.device_get(lora), scale), path)
  return path


def load(path):
  """The LoRA tree from a ``.safetensors`` file (or a directory holding ``LORA_FILE``)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    path = os.path.join(path, LORA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LoRA file {path!r} not found")
  return from_diffusers(load_file(path))
