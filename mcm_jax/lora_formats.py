"""The LoRA file layouts users meet, to and from the LoRA tree (``{flax module path: {'a', 'b'}}``
in diffusers' layout, the delta ``a @ b`` over the rank axis; the scale is folded into ``b``). ``a`` has the
kernel's shape with ``out`` replaced by the rank, ``b`` is ``[r, out]``: ``a [in, r]`` for a Dense
kernel ``[in, out]``, ``a [kh, kw, in, r]`` for a convolution ``[kh, kw, in, out]``.

- 'peft': what diffusers' ``load_lora_weights`` reads for SDXL and what training exports
  (``unet.<module>.lora_A.weight [r, in]``, ``unet.<module>.lora_B.weight [out, r]``);
- 'diffusers_old': diffusers' pre-PEFT layouts (``unet.<module>.lora.down.weight [r, in]`` /
  ``.lora.up.weight [out, r]``, and attention processors'
  ``<attn>.processor.to_q_lora.down.weight``);
- 'kohya': ComfyUI, AUTOMATIC1111, kohya sd-scripts (``lora_unet_<module with _>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``, the delta ``alpha / r * up @ down``), written as diffusers'
  ``convert_state_dict_to_kohya`` writes it (alpha = r).

In every layout a convolution's down (A) is ``[r, in, kh, kw]`` and its up (B) ``[out, r, 1, 1]``
(PyTorch's ``[out, in, kh, kw]`` delta is ``up @ down`` over r). ``<module>`` is the PyTorch
module name of diffusers' UNet (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``);
kohya files may also use the original SDXL (LDM / sgm) names that kohya sd-scripts' SDXL trainer
writes (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``ldm_names``). Reading detects the
layout from the keys; kohya's underscored names are resolved against the UNet's kernels.
"""
import re

import numpy as np

from mcm_jax.errors import UserError
from mcm_jax.models import sdxl_unet

LAYOUTS = ("peft", "diffusers_old", "kohya")
_PEFT = re.compile(r"^unet\.(.+)\.lora_([AB])\.weight$")
_OLD = re.compile(r"^(?:unet\.)?(.+?)\.(?:lora\.(down|up)\.weight|alpha)$")
_PROCESSOR = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)"
                        r"\.weight$")
_KOHYA = re.compile(r"^lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_TEXT_ENCODER = re.compile(r"^(text_encoder|lora_te\d?_|te\d?\.)")


def torch_module_name(path):
  """'down_blocks_1/attentions_0/.../to_out_0' -> 'down_blocks.1.attentions.0....to_out.0'
  (diffusers' own 'linear_1' of the time / added-condition embeddings keeps its '_')."""
  return ".".join(re.sub(r"(?<!linear)_(\d+)$", r".\1", seg) for seg in path.split("/"))


def flax_path(name):
  """Inverse of ``torch_module_name``."""
  return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", "/")


def kohya_name(path):
  """The kohya key stem of a module: 'lora_unet_' + its PyTorch name with '.' -> '_'."""
  return "lora_unet_" + torch_module_name(path).replace(".", "_")


_LDM_OUTSIDE_BLOCKS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                       "time_embedding.linear_2": "time_embed.2",
                       "add_embedding.linear_1": "label_emb.0.0",
                       "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}
_LDM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"^(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?"
                    r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")


def ldm_names(paths):
  """{flax module path: its name in the original SDXL UNet (LDM / sgm, as kohya sd-scripts' SDXL
  trainer names modules)} for those of the diffusers UNet module ``paths`` that have one.

  Each down block of n resnets is n input blocks (resnet j as '.0', its attention as '.1') and
  one more holding the downsampler ('.0.op'); each up block of n + 1 resnets is n + 1 output
  blocks, the upsampler as '.2.conv' of the last (in SDXL it follows an attention); the mid
  block is middle_block.0 / .1 / .2 (resnet, attention, resnet); input_blocks.0.0 is conv_in.
  Inside a resnet conv1 / time_emb_proj / conv2 / conv_shortcut are in_layers.2 / emb_layers.1 /
  out_layers.3 / skip_connection; attention modules keep their names. For SDXL:
  'down_blocks.1.attentions.0.proj_in' -> 'input_blocks.4.1.proj_in'."""
  names = {p: torch_module_name(p) for p in paths}
  resnets = {m.group(1, 2, 4) for m in map(_BLOCK.match, names.values())
             if m and m.group(3) == "resnets"}
  down = 1 + sum(k[:2] == ("down_blocks", "0") for k in resnets)  # input blocks per down block
  up = sum(k[:2] == ("up_blocks", "0") for k in resnets)  # output blocks per up block
  out = {}
  for path, name in names.items():
    m = _BLOCK.match(name)
    if not m:
      if name in _LDM_OUTSIDE_BLOCKS:
        out[path] = _LDM_OUTSIDE_BLOCKS[name]
      continue
    kind, b, inner, j, rest = m.groups()
    slot, rest = {"resnets": (0, _LDM_RESNET.get(rest, rest)), "attentions": (1, rest),
                  "downsamplers": (0, "op"), "upsamplers": (2, rest)}[inner]
    if kind == "mid_block":
      out[path] = f"middle_block.{2 * int(j) if inner == 'resnets' else 1}.{rest}"
    elif kind == "down_blocks":
      i = 1 + int(b) * down + (down - 1 if inner == "downsamplers" else int(j))
      out[path] = f"input_blocks.{i}.{slot}.{rest}"
    else:
      i = int(b) * up + (up - 1 if inner == "upsamplers" else int(j))
      out[path] = f"output_blocks.{i}.{slot}.{rest}"
  return out


def _torch_down_up(ab, scale, dtype=np.float32):
  """(down, up) of a tree entry in PyTorch's layouts, ``scale`` folded into up: [r, in] and
  [out, r] for a Dense kernel, [r, in, kh, kw] and [out, r, 1, 1] for a convolution; C-contiguous
  copies (safetensors writes the raw buffer: a transposed view would scramble)."""
  a, b = np.asarray(ab["a"], np.float32), scale * np.asarray(ab["b"], np.float32)
  down = a.transpose((a.ndim - 1, a.ndim - 2) + tuple(range(a.ndim - 2)))
  up = b.T.reshape(b.T.shape + (1,) * (a.ndim - 2))
  return np.ascontiguousarray(down, dtype), np.ascontiguousarray(up, dtype)


def to_peft(lora, scale=1.0):
  """{PEFT key: float32 numpy array} (scale folded into lora_B)."""
  out = {}
  for path, ab in lora.items():
    name = f"unet.{torch_module_name(path)}"
    out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = _torch_down_up(ab, scale)
  return out


def to_kohya(lora, scale=1.0, dtype=np.float32):
  """{kohya key: numpy array}: lora_down, lora_up (scale folded in), and alpha = r so that
  kohya's ``alpha / r`` is 1 (as ``convert_state_dict_to_kohya``)."""
  out = {}
  for path, ab in lora.items():
    stem = kohya_name(path)
    out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = _torch_down_up(ab, scale,
                                                                                   dtype)
    out[f"{stem}.alpha"] = np.asarray(np.shape(ab["a"])[-1], np.int64)
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
  """``(layout, {module name: {'down' [r, in] or [r, in, kh, kw], 'up' [out, r], 'alpha'?}})``
  grouped by module in the file's own naming (PyTorch module names; kohya's underscored stems),
  without the UNet: every module complete, down and up of one rank and of a Dense layer's or a
  convolution's shape (a convolution's up [out, r, 1, 1] is squeezed); errors name ``source``."""
  layout = detect(state_dict, source)
  parts = {}
  for key, value in state_dict.items():
    if _TEXT_ENCODER.match(key):
      continue
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
    value = np.asarray(value, np.float32)
    conv = value.ndim == 4 and (part == "down" or value.shape[2:] == (1, 1))
    if part != "alpha" and value.ndim != 2 and not conv:
      raise UserError(f"{source}: {key} has shape {value.shape}; allowed: down (A) [r, in] and "
                      "up (B) [out, r] (LoRA of a Dense layer), or [r, in, kh, kw] and "
                      "[out, r, 1, 1] (of a convolution)")
    parts.setdefault(name, {})[part] = value.reshape(value.shape[:2]) if part == "up" else value
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
  ``b``. ``params`` (the UNet's) resolve kohya's underscored module names (diffusers' or the
  original SDXL ones, ``ldm_names``); a module that is not a Dense layer or a convolution there
  is an error naming it."""
  kernels = set(sdxl_unet.kernel_shapes(params))
  by_kohya = {kohya_name(p)[len("lora_unet_"):]: p for p in kernels}
  by_kohya.update({name.replace(".", "_"): p for p, name in ldm_names(kernels).items()})
  lora = {}
  for name, p in sorted(parts.items()):
    path = by_kohya.get(name) if layout == "kohya" else flax_path(name)
    if path not in kernels:
      hint = (" (kohya names are read as diffusers' or the original SDXL UNet's, e.g. "
              "'input_blocks_4_1_proj_in')" if layout == "kohya" else "")
      raise UserError(f"{source}: module {name!r} ({layout} layout) is not a Dense layer or a "
                      f"convolution of this UNet{hint}")
    factor = float(p["alpha"]) / p["down"].shape[0] if "alpha" in p else 1.0
    down = p["down"]  # [r, in, kh, kw] -> a [kh, kw, in, r], as the kernel [kh, kw, in, out]
    lora[path] = {"a": down.transpose(tuple(range(2, down.ndim)) + (1, 0)),
                  "b": factor * p["up"].T}
  return lora
