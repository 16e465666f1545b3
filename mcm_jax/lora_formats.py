"""The LoRA file layouts users meet, to and from the LoRA tree (``{flax module path: {'a' [in, r],
'b' [r, out]}}``, ``W' = W + a @ b``; the scale is folded into ``b``):

- 'peft': what diffusers' ``load_lora_weights`` reads for SDXL and what training exports
  (``unet.<module>.lora_A.weight [r, in]``, ``unet.<module>.lora_B.weight [out, r]``);
- 'diffusers_old': diffusers' pre-PEFT layouts (``unet.<module>.lora.down.weight [r, in]`` /
  ``.lora.up.weight [out, r]``, and attention processors' ``<attn>.processor.to_q_lora.down.weight``);
- 'kohya': ComfyUI, AUTOMATIC1111, kohya sd-scripts (``lora_unet_<module with _>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``, the delta ``alpha / r * up @ down``), written as diffusers'
  ``convert_state_dict_to_kohya`` writes it (alpha = r).

``<module>`` is the PyTorch module name of diffusers' UNet (``down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q``). Reading detects the layout from the keys; kohya's
underscored names are resolved against the UNet's Dense modules.
"""
import re

import numpy as np
from flax.traverse_util import flatten_dict

from mcm_jax.errors import UserError

LAYOUTS = ("peft", "diffusers_old", "kohya")
_PEFT = re.compile(r"^unet\.(.+)\.lora_([AB])\.weight$")
_OLD = re.compile(r"^(?:unet\.)?(.+?)\.(?:lora\.(down|up)\.weight|alpha)$")
_PROCESSOR = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)"
                        r"\.weight$")
_KOHYA = re.compile(r"^lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_TEXT_ENCODER = re.compile(r"^(text_encoder|lora_te\d?_|te\d?\.)")


def torch_module_name(path):
  """'down_blocks_1/attentions_0/.../to_out_0' -> 'down_blocks.1.attentions.0....to_out.0'."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", seg) for seg in path.split("/"))


def flax_path(name):
  """Inverse of ``torch_module_name``."""
  return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", "/")


def kohya_name(path):
  """The kohya key stem of a module: 'lora_unet_' + its PyTorch name with '.' -> '_'."""
  return "lora_unet_" + torch_module_name(path).replace(".", "_")


def to_peft(lora, scale=1.0):
  """{PEFT key: float32 numpy array} (scale folded into lora_B)."""
  out = {}
  for path, ab in lora.items():
    name = f"unet.{torch_module_name(path)}"
    out[f"{name}.lora_A.weight"] = np.asarray(ab["a"], np.float32).T.copy()
    out[f"{name}.lora_B.weight"] = (scale * np.asarray(ab["b"], np.float32)).T.copy()
  return out


def to_kohya(lora, scale=1.0, dtype=np.float32):
  """{kohya key: numpy array}: lora_down [r, in], lora_up [out, r] (scale folded in), and alpha
  = r so that kohya's ``alpha / r`` is 1 (as ``convert_state_dict_to_kohya``)."""
  out = {}
  for path, ab in lora.items():
    stem = kohya_name(path)
    a = np.asarray(ab["a"], np.float32)
    # C-contiguous copies: safetensors writes the raw buffer (a transposed view would scramble)
    out[f"{stem}.lora_down.weight"] = np.ascontiguousarray(a.T, dtype)
    out[f"{stem}.lora_up.weight"] = np.ascontiguousarray(
        (scale * np.asarray(ab["b"], np.float32)).T, dtype)
    out[f"{stem}.alpha"] = np.asarray(a.shape[1], np.int64)
  return out


def detect(state_dict, source="LoRA"):
  """The layout of a state dict (text-encoder keys ignored); a UserError naming the first key
  that fits none."""
  unet = [k for k in state_dict if not _TEXT_ENCODER.match(k)]
  if not unet:
    raise UserError(f"{source} holds no UNet LoRA weights (only text-encoder keys, or none)")
  for layout, pattern in (("peft", _PEFT), ("kohya", _KOHYA)):
    if all(pattern.match(k) for k in unet):
      return layout
  if all(_OLD.match(k) or _PROCESSOR.match(k) for k in unet):
    return "diffusers_old"
  first = next(k for k in unet if not any(p.match(k) for p in (_PEFT, _KOHYA, _OLD, _PROCESSOR)))
  raise UserError(f"{source}: LoRA key {first!r} fits none of the layouts {LAYOUTS} (expected "
                  "e.g. 'unet.<module>.lora_A.weight', 'unet.<module>.lora.down.weight' or "
                  "'lora_unet_<module>.lora_down.weight')")


def module_parts(state_dict, source="LoRA"):
  """``(layout, {module name: {'down' [r, in], 'up' [out, r], 'alpha'?}})`` grouped by module in
  the file's own naming (PyTorch module names; kohya's underscored stems), without the UNet:
  every matrix 2-D, every module complete, down and up of one rank; errors name ``source``."""
  layout = detect(state_dict, source)
  parts = {}
  for key, value in state_dict.items():
    if _TEXT_ENCODER.match(key):
      continue
    value = np.asarray(value, np.float32)
    if value.ndim != 2 and not key.endswith(".alpha"):
      raise UserError(f"{source}: {key} has shape {value.shape}; allowed: 2-D (LoRA of Dense "
                      "layers)")
    if layout == "peft":
      name, which = _PEFT.match(key).groups()
      part = {"A": "down", "B": "up"}[which]
    elif layout == "kohya":
      name, which = _KOHYA.match(key).groups()
      part = which.split(".")[0].replace("lora_", "")
    elif _PROCESSOR.match(key):
      attn, proj, part = _PROCESSOR.match(key).groups()
      name = f"{attn}.{'to_out.0' if proj == 'to_out' else proj}"
    else:
      name, part = _OLD.match(key).groups()
      part = part or "alpha"
    parts.setdefault(name, {})[part] = value
  for name, p in sorted(parts.items()):
    if "down" not in p or "up" not in p:
      raise UserError(f"{source}: module {name!r} lacks its "
                      f"{'down (A)' if 'down' not in p else 'up (B)'} matrix")
    if p["up"].shape[1] != p["down"].shape[0]:
      raise UserError(f"{source}: module {name!r} has a down (A) matrix of rank "
                      f"{p['down'].shape[0]} and an up (B) matrix of rank {p['up'].shape[1]}; "
                      "they must be equal")
  return layout, parts


def from_state_dict(state_dict, params, source="LoRA"):
  """The LoRA tree from a state dict in any of ``LAYOUTS`` (``to_tree`` of ``module_parts``)."""
  return to_tree(*module_parts(state_dict, source), params, source)


def to_tree(layout, parts, params, source="LoRA"):
  """The LoRA tree from ``module_parts``' output, with each module's ``alpha / r`` folded into
  ``b``. ``params`` (the UNet's) resolve kohya's underscored module names; a module that is
  not a Dense layer there is an error naming it."""
  dense = {"/".join(k[:-1]) for k, v in flatten_dict(params).items()
           if k[-1] == "kernel" and len(np.shape(v)) == 2}
  by_kohya = {kohya_name(p)[len("lora_unet_"):]: p for p in dense}
  lora = {}
  for name, p in sorted(parts.items()):
    path = by_kohya.get(name) if layout == "kohya" else flax_path(name)
    if path not in dense:
      hint = (" (kohya files of SDXL with diffusers module names are read; LDM names such as "
              "'input_blocks_4_1' are not)" if layout == "kohya" else "")
      raise UserError(f"{source}: module {name!r} ({layout} layout) is not a Dense layer of this "
                      f"UNet{hint}")
    factor = float(p["alpha"]) / p["down"].shape[0] if "alpha" in p else 1.0
    lora[path] = {"a": p["down"].T, "b": factor * p["up"].T}
  return lora
