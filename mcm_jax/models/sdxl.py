"""SDXL's UNet in Flax (diffusers' ``FlaxUNet2DConditionModel``): build, load, apply.

``load_unet(path)`` reads a local diffusers-layout directory (an SDXL root with ``unet/``, or the
``unet`` folder itself) holding ``config.json`` and either Flax weights
(``diffusion_flax_model.msgpack``) or PyTorch safetensors (``diffusion_pytorch_model
[.fp16].safetensors``, what users have). PyTorch names and layouts are converted with diffusers'
own renaming rules, against parameter shapes from ``jax.eval_shape`` (no random init in memory);
a missing, unexpected or mis-shaped weight is an error naming it. Nothing is downloaded.

``make_eps_fn(model)`` gives ``eps(params, z [B, H, W, 4] NHWC, t [B] (0..999), cond)`` with
``cond = {'context': [B, L, D], 'text_embeds': [B, P], 'time_ids': [B, 6]}`` (the Flax UNet takes
NCHW; transposes happen here, once).
"""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# A tiny SDXL-architecture UNet for tests and the CPU demo: text_time added conditioning, linear
# projections, transformer_layers_per_block (1, 2). Channels are multiples of 32 because the Flax
# UNet always uses 32 GroupNorm groups (it has no norm_num_groups field).
TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
    cross_attention_dim=32, transformer_layers_per_block=(1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32)

FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
PT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def _drop_flax_deprecation(record):
  return "Flax classes are deprecated" not in record.getMessage()


def _flax_unet_class():
  """diffusers' Flax UNet; its "Flax classes are deprecated" notice (logged at every trace) is
  filtered from diffusers' log handlers -- we pin diffusers < 0.40 for exactly that reason."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
    from diffusers.utils import logging as dlogging  # pylint: disable=g-import-not-at-top
  for handler in dlogging._get_library_root_logger().handlers:  # pylint: disable=protected-access
    if _drop_flax_deprecation not in handler.filters:
      handler.addFilter(_drop_flax_deprecation)
  return FlaxUNet2DConditionModel


def unet_from_config(config, dtype=jnp.float32):
  """A FlaxUNet2DConditionModel from a diffusers config dict (as in ``unet/config.json``)."""
  cls = _flax_unet_class()
  groups = config.get("norm_num_groups", 32)
  if groups != 32:
    raise ValueError(f"UNet config norm_num_groups={groups} is not supported: diffusers' Flax "
                     "UNet always uses 32 GroupNorm groups, so it would compute another function")
  fields = set(cls.__dataclass_fields__) - {"parent", "name", "dtype"}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return cls(**kwargs, dtype=dtype)


def param_shapes(model):
  """{('down_blocks_1', ..., 'kernel'): ShapeDtypeStruct} without allocating parameters."""
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  return flatten_dict(jax.eval_shape(model.init_weights, jax.random.PRNGKey(0)))


def params_from_pytorch(state_dict, model):
  """Flax params from a PyTorch UNet state dict ({name: array}); checks every name and shape."""
  from flax.traverse_util import unflatten_dict  # pylint: disable=g-import-not-at-top
  from diffusers.models import modeling_flax_pytorch_utils as conv  # pylint: disable=g-import-not-at-top
  shapes = param_shapes(model)
  out = {}
  for pt_key, tensor in state_dict.items():
    tensor = np.asarray(tensor).astype(np.float32)  # also bf16 / fp16 files
    key, value = conv.rename_key_and_reshape_tensor(
        tuple(conv.rename_key(pt_key).split(".")), tensor, shapes)
    if key not in shapes:
      raise ValueError(f"UNet weight {pt_key!r} has no place in this UNet config (as {key})")
    if tuple(value.shape) != shapes[key].shape:
      raise ValueError(f"UNet weight {pt_key!r}: shape {tuple(np.shape(tensor))} gives "
                       f"{tuple(value.shape)} for {'/'.join(key)}, expected {shapes[key].shape}")
    out[key] = jnp.asarray(value, jnp.float32)
  missing = sorted("/".join(k) for k in set(shapes) - set(out))
  if missing:
    raise ValueError(f"UNet weights lack {len(missing)} parameters of this config, e.g. "
                     f"{missing[:3]}")
  return unflatten_dict(out)


def unet_dir(path):
  """The folder holding the UNet's config.json: ``path`` itself or ``path/unet``."""
  for candidate in (path, os.path.join(path, "unet")):
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  raise FileNotFoundError(f"no UNet config.json in {path!r} or {os.path.join(path, 'unet')!r}; "
                          "pass a local diffusers-layout SDXL (or UNet) directory")


def load_unet(path, dtype=jnp.float32):
  """(model, params) from a local directory (see module docstring); params are float32."""
  directory = unet_dir(path)
  with open(os.path.join(directory, "config.json")) as f:
    model = unet_from_config(json.load(f), dtype)
  flax_file = os.path.join(directory, FLAX_WEIGHTS)
  if os.path.isfile(flax_file):
    from flax import serialization  # pylint: disable=g-import-not-at-top
    from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
    with open(flax_file, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    params = params.get("params", params)
    shapes, got = param_shapes(model), flatten_dict(params)
    for key in sorted(set(shapes) | set(got)):
      if key not in got or key not in shapes or tuple(got[key].shape) != shapes[key].shape:
        raise ValueError(f"{flax_file}: parameter {'/'.join(key)} is "
                         f"{tuple(got[key].shape) if key in got else 'missing'}, expected "
                         f"{shapes[key].shape if key in shapes else 'nothing'}")
    return model, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  for name in PT_WEIGHTS:
    pt_file = os.path.join(directory, name)
    if os.path.isfile(pt_file):
      from safetensors.flax import load_file  # pylint: disable=g-import-not-at-top
      return model, params_from_pytorch(load_file(pt_file), model)
  raise FileNotFoundError(f"{directory} has neither {FLAX_WEIGHTS} nor {' / '.join(PT_WEIGHTS)} "
                          "(PyTorch .bin pickles are not read: convert them to safetensors)")


def make_eps_fn(model):
  """``eps(params, z NHWC, t [B], cond) -> eps NHWC`` (SDXL predicts epsilon)."""

  def eps(params, z, t, cond):
    out = model.apply({"params": params}, jnp.transpose(z, (0, 3, 1, 2)),
                      jnp.asarray(t, jnp.float32), cond["context"],
                      added_cond_kwargs={"text_embeds": cond["text_embeds"],
                                         "time_ids": cond["time_ids"]}).sample
    return jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)

  return eps
