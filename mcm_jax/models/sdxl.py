"""SDXL's UNet in Flax (``sdxl_unet``: diffusers' ``FlaxUNet2DConditionModel`` with scanned
transformer blocks) and its VAE: build, load, apply; the loader of transformers' Flax models
(``load_flax_transformer``) the text encoders and scorers use (``sdxl_text``, ``scorers``).

``load_unet(path)`` reads a local diffusers-layout directory (an SDXL root with ``unet/``, or the
``unet`` folder itself) holding ``config.json`` and either Flax weights
(``diffusion_flax_model.msgpack``) or PyTorch safetensors (``diffusion_pytorch_model
[.fp16].safetensors``, what users have). PyTorch names and layouts are converted with diffusers'
own renaming rules, against parameter shapes from ``jax.eval_shape`` (no random init in memory),
one tensor at a time straight into the dtype the parameters are kept in and the UNet's scanned
layout (``sdxl_unet.layout``); a missing, unexpected or mis-shaped weight, and an unreadable
(truncated, corrupt) file, is an error naming it. The text encoders read ``model.safetensors``
or the fp16 variant ``model.fp16.safetensors`` the same way (``sdxl_text``). Nothing is
downloaded.

``make_eps_fn(model)`` gives ``eps(params, z [B, H, W, 4] NHWC, t [B] (0..999), cond)`` (params
plain or ``sdxl_unet.Adapted``: with a LoRA) and
``make_denoiser(model)`` the same UNet as an x-predicting denoiser (what MLCM and the samplers
take), with ``cond = {'context': [B, L, D], 'text_embeds': [B, P], 'time_ids': [B, 6]}`` (the
UNet takes NCHW, as diffusers'; transposes happen here, once).
"""
import json
import mmap
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import parameterization, schedules, storage
from mcm_jax.errors import UserError
from mcm_jax.models import sdxl_controlnet, sdxl_unet

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

# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json; the fields
# the Flax class reads): the shapes ``--mode=plan`` uses when no local SDXL directory is given.
SDXL_BASE_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, addition_embed_type="text_time",
    addition_time_embed_dim=256, addition_embed_type_num_heads=64,
    projection_class_embeddings_input_dim=2816)

# SDXL base 1.0's VAE (vae/config.json): what ``--mode=plan`` uses when no local SDXL directory
# is given, and the random full-size directory's (benchmarks/make_random_sdxl.py).
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.13025, force_upcast=True)

FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
PT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def _diffusers_flax_class(name):
  """A diffusers Flax class by name (its deprecation notice quieted: ``sdxl_unet.diffusers``)."""
  return getattr(sdxl_unet.diffusers(), name)


def unet_from_config(config, dtype=jnp.float32, remat="none", attention="xla"):
  """SDXL's UNet from a diffusers config dict (as in ``unet/config.json``):
  ``sdxl_unet.SDXLUNet``, diffusers' function with scanned transformer blocks (``remat`` and
  ``attention`` as there), on diffusers' parameter layout."""
  groups = config.get("norm_num_groups", 32)
  if groups != 32:
    raise UserError(f"UNet config norm_num_groups={groups} is not supported: diffusers' Flax "
                    "UNet always uses 32 GroupNorm groups, so it would compute another function")
  return sdxl_unet.unet(config, dtype, remat, attention)


def _from_config(cls, config, dtype):
  """A diffusers Flax ``cls`` (the VAE; diffusers' UNet in tests) from a config dict."""
  fields = set(cls.__dataclass_fields__) - {"parent", "name", "dtype"}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return cls(**kwargs, dtype=dtype)


def param_shapes(model):
  """{('down_blocks_1', ..., 'kernel'): ShapeDtypeStruct} without allocating parameters (the
  UNet's in the scanned layout)."""
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  return flatten_dict(jax.eval_shape(model.init_weights, jax.random.PRNGKey(0)))


def assemble_params(named_tensors, shapes, what, dtype=jnp.float32):
  """The parameter tree of the model whose ``param_shapes`` are ``shapes`` (scanned layout for
  the UNet) in ``dtype`` from ``named_tensors``: (diffusers-layout Flax key tuple, numpy array,
  its name for errors), read one at a time. Each tensor is cast straight into its place (a
  transformer block's into its slice of the stacked leaf): no second copy of the weights. Every
  name and shape is checked; errors start with ``what`` (the file)."""
  from flax.traverse_util import unflatten_dict  # pylint: disable=g-import-not-at-top
  places = sdxl_unet.layout(unflatten_dict(shapes))
  out, filled = {}, set()
  for key, tensor, name in named_tensors:
    if key not in places:
      raise UserError(f"{what}: weight {name} has no place in this config (as "
                      f"{'/'.join(key)})")
    skey, index, shape = places[key]
    if tuple(np.shape(tensor)) != shape:
      raise UserError(f"{what}: weight {name} gives {tuple(np.shape(tensor))} for "
                      f"{'/'.join(key)}, expected {shape}")
    if skey not in out:
      out[skey] = host_buffer(shapes[skey].shape, dtype)
    if index is None:
      out[skey][...] = tensor
    else:
      out[skey][index] = tensor
    filled.add(key)
  missing = sorted("/".join(k) for k in set(places) - filled)
  if missing:
    raise UserError(f"{what}: the weights lack {len(missing)} parameters of this config, e.g. "
                    f"{missing[:3]}")
  return unflatten_dict({k: to_device(out.pop(k)) for k in list(out)})  # one leaf at a time


def host_buffer(shape, dtype):
  """``np.empty(shape, dtype)`` in its own anonymous memory map: page-aligned, so XLA:CPU takes
  it as a device buffer without copying it (``to_device``), and returned to the system as soon
  as that buffer is freed (malloc's heap would keep freed weights' pages mapped)."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  if size == 0:
    return np.empty(shape, dtype)
  return np.frombuffer(mmap.mmap(-1, size), dtype).reshape(shape)


def to_device(array):
  """A host array handed over to JAX's default device: on CPU the aligned array itself
  (``host_buffer``; the caller drops its reference), elsewhere a copy."""
  return jax.device_put(array, may_alias=True)


def pytorch_to_flax_names(tensors, shapes):
  """(Flax key tuple, array, PyTorch name) for each (name, array) of a PyTorch state dict of the
  diffusers model whose ``param_shapes`` are ``shapes``, by diffusers' own renaming and
  reshaping rules."""
  from diffusers.models import modeling_flax_pytorch_utils as conv  # pylint: disable=g-import-not-at-top
  from flax.traverse_util import unflatten_dict  # pylint: disable=g-import-not-at-top
  places = sdxl_unet.layout(unflatten_dict(shapes))
  diffusers_shapes = {k: jax.ShapeDtypeStruct(shape, jnp.float32)
                      for k, (_, _, shape) in places.items()}
  for name, tensor in tensors:
    key, value = conv.rename_key_and_reshape_tensor(
        tuple(conv.rename_key(name).split(".")), tensor, diffusers_shapes)
    yield key, value, f"{name!r} of shape {tuple(np.shape(tensor))}"


def component_dir(path, name):
  """The folder holding a component's config.json: ``path`` itself or ``path/<name>``."""
  for candidate in (path, os.path.join(path, name)):
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  raise FileNotFoundError(f"no {name} config.json in {path!r} or {os.path.join(path, name)!r}; "
                          f"pass a local diffusers-layout SDXL (or {name}) directory")


def read_json(path):
  """A JSON file's contents; a UserError naming the file and the position when it is not JSON."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise UserError(f"{path} is not valid JSON: {e}") from e


def iter_safetensors(path):
  """(name, numpy array) of each tensor of a safetensors file, read one at a time from the
  memory-mapped file; a UserError naming the file when it is truncated or not safetensors."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        yield name, f.get_tensor(name)
  except (SafetensorError, OSError) as e:
    raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt: {e}); "
                    "download or export it again") from e


def _read_msgpack(path):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  try:
    params = serialization.msgpack_restore(data)
  except ValueError as e:  # msgpack's errors are ValueErrors
    raise UserError(f"{path} is not a readable Flax msgpack file (truncated or corrupt: {e}); "
                    "download or export it again") from e
  if not isinstance(params, dict):
    raise UserError(f"{path} holds a {type(params).__name__}, not a parameter tree")
  return params


def _diffusers_model(path, name, build):
  """(model, its directory) of a diffusers-layout model in ``path`` or ``path/<name>``:
  ``build(config dict)`` of its checked ``config.json``; no weights read."""
  directory = component_dir(path, name)
  config_file = os.path.join(directory, "config.json")
  config = read_json(config_file)
  if not isinstance(config, dict):
    raise UserError(f"{config_file} is not a diffusers config (a JSON object)")
  try:
    return build(config), directory
  except (KeyError, TypeError, UserError) as e:  # another architecture's config
    raise UserError(f"{config_file}: not an SDXL {name} config ({type(e).__name__}: {e})") from e


def _load_diffusers(path, name, build, dtype=jnp.float32):
  """(model, params in ``dtype``) of a diffusers-layout model from ``path`` or ``path/<name>``,
  ``build(config dict)`` making the model; the directory and its config are checked first."""
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  model, directory = _diffusers_model(path, name, build)
  flax_file = os.path.join(directory, FLAX_WEIGHTS)
  if os.path.isfile(flax_file):
    params = _read_msgpack(flax_file)
    tensors = ((k, v, repr("/".join(k))) for k, v in
               flatten_dict(params.get("params", params)).items())
    return model, assemble_params(tensors, param_shapes(model), flax_file, dtype)
  for weights in PT_WEIGHTS:
    pt_file = os.path.join(directory, weights)
    if os.path.isfile(pt_file):
      shapes = param_shapes(model)
      tensors = pytorch_to_flax_names(iter_safetensors(pt_file), shapes)
      return model, assemble_params(tensors, shapes, pt_file, dtype)
  raise FileNotFoundError(f"{directory} has neither {FLAX_WEIGHTS} nor {' / '.join(PT_WEIGHTS)} "
                          "(PyTorch .bin pickles are not read: convert them to safetensors)")


def load_unet(path, dtype=jnp.float32, remat="none", attention="xla", param_dtype=jnp.float32):
  """(model, params) from a local directory (see module docstring): the model is
  ``unet_from_config``'s (compute ``dtype``), params in ``param_dtype`` and the scanned layout."""
  return _load_diffusers(path, "unet", lambda cfg: unet_from_config(cfg, dtype, remat, attention),
                         param_dtype)


def load_controlnet(path, unet_model, dtype=jnp.float32, param_dtype=jnp.float32):
  """(ControlNet, params) of a local diffusers ControlNet directory (``config.json`` and
  ``diffusion_pytorch_model[.fp16].safetensors``, e.g. diffusers/controlnet-canny-sdxl-1.0)
  for ``unet_model``: one of another architecture is an error naming its config file."""
  return _load_diffusers(
      path, "controlnet", lambda cfg: sdxl_controlnet.controlnet(cfg, unet_model.config, dtype),
      param_dtype)


def with_guidance_embedding(model, dim):
  """The UNet ``model`` as LCM's guidance-conditioned student: its config with
  ``time_cond_proj_dim = dim`` (a model that has a guidance embedding already is returned as
  it is). It also applies parameters without the embedding's projection, called without a
  ``timestep_cond`` (the teacher)."""
  if model.config.get("time_cond_proj_dim"):
    return model
  return sdxl_unet.SDXLUNet(model.module.clone(
      config=dict(model.config, time_cond_proj_dim=int(dim))))


def zero_guidance_projection(model, params):
  """``params`` of a UNet without a guidance embedding, for ``model`` (``with_guidance_embedding``):
  a zero ``time_embedding/cond_proj`` kernel [dim, C] added (LCM §4.2's "additional trainable
  parameters for conditioning on w"), so that the student starts as exactly the function of
  ``params``. Parameters that have the projection are returned as they are."""
  embedding = params["time_embedding"]
  if "cond_proj" in embedding:
    return params
  width = embedding["linear_1"]["kernel"]  # cond_proj's output is linear_1's input
  kernel = jnp.zeros((model.config["time_cond_proj_dim"], width.shape[0]), width.dtype)
  return dict(params, time_embedding=dict(embedding, cond_proj={"kernel": kernel}))


# diffusers' PyTorch ModuleList names: ``name.<i>`` in a state dict, ``name_<i>`` in Flax
TORCH_MODULE_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                      "upsamplers", "transformer_blocks", "to_out", "net")


def pytorch_name(key):
  """diffusers' PyTorch state-dict name of a diffusers-layout Flax key tuple (the inverse of
  diffusers' ``rename_key`` / ``rename_key_and_reshape_tensor`` naming): ``('down_blocks_1',
  'attentions_0', ..., 'to_out_0', 'kernel')`` -> ``'down_blocks.1.attentions.0....to_out.0.
  weight'``; 'kernel' and norms' 'scale' are 'weight'."""
  parts = []
  for part in key[:-1]:
    head, _, index = part.rpartition("_")
    parts.append(f"{head}.{index}" if head in TORCH_MODULE_LISTS and index.isdigit() else part)
  return ".".join(parts + ["weight" if key[-1] in ("kernel", "scale") else key[-1]])


def pytorch_tensor(key, value):
  """A Flax parameter in PyTorch's layout: Dense kernels [in, out] -> [out, in], convolution
  kernels [kh, kw, in, out] -> [out, in, kh, kw]."""
  if key[-1] == "kernel":
    return np.transpose(value, (3, 2, 0, 1) if value.ndim == 4 else (1, 0))
  return value


def pytorch_state_dict(params, dtype=np.float16):
  """{PyTorch name: numpy array in ``dtype``} of the UNet's scanned-layout ``params``: what
  diffusers' ``UNet2DConditionModel`` loads (each stacked block split out, one leaf at a time)."""
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  flat = flatten_dict(params)
  out = {}
  for key, (skey, index, _) in sdxl_unet.layout(params).items():
    value = flat[skey] if index is None else flat[skey][index]
    out[pytorch_name(key)] = np.ascontiguousarray(
        pytorch_tensor(key, np.asarray(jax.device_get(value)).astype(dtype)))
  return out


def save_unet(directory, model, params, dtype="float16"):
  """Writes ``directory/config.json`` (the UNet's diffusers config) and the weights in
  diffusers' PyTorch layout, ``diffusion_pytorch_model.fp16.safetensors`` for float16 (what
  ``UNet2DConditionModel.from_pretrained(directory, variant='fp16')`` and ``load_unet`` read)
  or ``diffusion_pytorch_model.safetensors``; returns the weights' path."""
  from safetensors.numpy import save, save_file  # pylint: disable=g-import-not-at-top
  storage.makedirs(directory)
  config = {"_class_name": "UNet2DConditionModel",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}}
  storage.write_json(os.path.join(directory, "config.json"), config)
  name = PT_WEIGHTS[1] if np.dtype(dtype) == np.float16 else PT_WEIGHTS[0]
  path = os.path.join(directory, name)
  tensors = pytorch_state_dict(params, np.dtype(dtype))
  if storage.is_url(path):
    storage.write_bytes(path, save(tensors))
  else:  # written from the arrays, no second copy of the file in memory
    save_file(tensors, path)
  return path


def _vae_from_config(dtype):
  return lambda cfg: _from_config(_diffusers_flax_class("FlaxAutoencoderKL"), cfg, dtype)


def load_vae(path, dtype=jnp.float32):
  """(model, params) of SDXL's VAE (``FlaxAutoencoderKL``) from ``path`` or ``path/vae``."""
  return _load_diffusers(path, "vae", _vae_from_config(dtype))


def abstract_vae(path, dtype=jnp.float32):
  """``load_vae``'s (model, params) with the parameters as ShapeDtypeStructs: the config read,
  no weights (``--mode=plan``); SDXL's VAE (``SDXL_VAE_CONFIG``) when ``path`` is not a local
  directory."""
  if os.path.isdir(path):
    model, _ = _diffusers_model(path, "vae", _vae_from_config(dtype))
  else:
    model = _vae_from_config(dtype)(SDXL_VAE_CONFIG)
  return model, jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))


def vae_scale_factor(path):
  """Pixels per latent of the VAE in ``path`` (or ``path/vae``): 2^(its blocks - 1), as
  diffusers' pipelines compute it (8 for SDXL)."""
  config = read_json(os.path.join(component_dir(path, "vae"), "config.json"))
  return 2 ** (len(config["block_out_channels"]) - 1)


def make_decoder(vae):
  """``decode(params, latents NHWC) -> images NHWC in [-1, 1]`` (latents as the UNet sees them:
  divided by the VAE's scaling factor first, 0.13025 for SDXL)."""
  scaling = vae.config.scaling_factor

  def decode(params, latents):
    out = vae.apply({"params": params}, latents / scaling, method=vae.decode).sample
    return jnp.clip(jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32), -1, 1)

  return decode


def make_encoder(vae):
  """``encode(params, images NHWC in [-1, 1], eps=None) -> latents NHWC`` as the UNet sees them:
  the VAE posterior's ``mean + std * eps`` (its mean when ``eps`` is None) times the scaling
  factor (diffusers' ``retrieve_latents`` then ``* scaling_factor``)."""
  scaling = vae.config.scaling_factor

  def encode(params, images, eps=None):
    posterior = vae.apply({"params": params}, jnp.transpose(images, (0, 3, 1, 2)),
                          method=vae.encode).latent_dist
    z = posterior.mean if eps is None else posterior.mean + posterior.std * eps
    return scaling * z.astype(jnp.float32)

  return encode


def time_ids(pixels, batch):
  """SDXL's micro-conditioning ``(original h, w, crop top, left, target h, w)`` [B, 6] for
  uncropped square images of ``pixels``."""
  return np.tile(np.array([[pixels, pixels, 0, 0, pixels, pixels]], np.float32), (batch, 1))


def make_eps_fn(model, controlnet=None):
  """The UNet as ``eps(params, z NHWC, t [B] timesteps, cond, rng=None) -> eps NHWC`` (SDXL
  predicts epsilon; ``rng`` is unused: the signature of ``make_denoiser``'s ``apply_fn``).
  ``cond``: 'context', 'text_embeds', 'time_ids', and for a UNet with ``time_cond_proj_dim``
  'timestep_cond' (``guidance.scale_embedding``). With a ``controlnet``
  (``sdxl_controlnet.SDXLControlNet``), ``params`` is ``sdxl_controlnet.Controlled`` and ``cond``
  also holds 'control' (the control image [B, H, W, C] in [0, 1]) and 'control_scale' [B]: the
  ControlNet's residuals enter the UNet."""

  def eps(params, z, t, cond, rng=None):
    del rng
    sample, t = jnp.transpose(z, (0, 3, 1, 2)), jnp.asarray(t, jnp.float32)
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    residuals = {}
    if controlnet is not None:
      down, mid = controlnet.apply({"params": params.controlnet}, sample, t, cond["context"],
                                   added, jnp.transpose(cond["control"], (0, 3, 1, 2)),
                                   cond["control_scale"])
      residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
      params = params.unet
    out = model.apply(sdxl_unet.variables(params), sample, t, cond["context"],
                      added_cond_kwargs=added, timestep_cond=cond.get("timestep_cond"),
                      **residuals).sample
    return jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)

  return eps


def make_denoiser(model, controlnet=None):
  """``denoise(params, z, t, cond) -> x_hat``: the epsilon UNet (``make_eps_fn``, a
  ``controlnet`` attached or not) through the shared ``parameterization.make_denoiser`` on
  ``schedules.sdxl_logsnr`` (conditioned on the timestep), the model form that ``mlcm``,
  ``guidance`` and ``samplers.addim`` take."""
  return parameterization.make_denoiser(make_eps_fn(model, controlnet), schedules.sdxl_logsnr,
                                        "eps", time_input="t")


TRANSFORMERS_WEIGHTS = ("flax_model.msgpack", "model.safetensors", "model.fp16.safetensors")


def load_flax_transformer(cls, directory, dtype=jnp.float32, unused=("position_ids",)):
  """(model, params in ``dtype``) of a transformers Flax class from a local dir holding
  config.json and one of ``TRANSFORMERS_WEIGHTS`` (PyTorch safetensors, fp16 variant or not,
  are renamed by transformers' rules and cast one tensor at a time; no random init). A missing,
  unexpected (other than names ending in one of ``unused``) or mis-shaped weight and an
  unreadable file are errors naming the file."""
  config_file = os.path.join(directory, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{directory!r} has no config.json")
  files = [os.path.join(directory, f) for f in TRANSFORMERS_WEIGHTS
           if os.path.isfile(os.path.join(directory, f))]
  if not files:
    raise FileNotFoundError(f"{directory} has none of {' / '.join(TRANSFORMERS_WEIGHTS)}")
  from flax.traverse_util import flatten_dict, unflatten_dict  # pylint: disable=g-import-not-at-top
  from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor  # pylint: disable=g-import-not-at-top
  try:
    config = cls.config_class.from_pretrained(directory, local_files_only=True)
  except (OSError, ValueError) as e:
    raise UserError(f"{config_file}: not a {cls.config_class.__name__} ({e})") from e
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = cls(config, _do_init=False, dtype=dtype)
  shapes = flatten_dict(model.params_shape_tree)
  weights = files[0]
  if weights.endswith(".msgpack"):
    tensors = ((k, v, "/".join(k)) for k, v in flatten_dict(_read_msgpack(weights)).items())
  else:
    def renamed(prefix=model.base_model_prefix):
      for name, tensor in iter_safetensors(weights):
        key, value = rename_key_and_reshape_tensor(tuple(name.split(".")), tensor, shapes, prefix)
        if key not in shapes and (prefix,) + key in shapes:
          key = (prefix,) + key
        if key in shapes or not name.endswith(tuple(unused)):
          yield key, value, name
    tensors = renamed()
  params, filled = {}, set()
  for key, tensor, name in tensors:
    if key not in shapes or tuple(np.shape(tensor)) != shapes[key].shape:
      raise UserError(f"{weights}: weight {name!r} of shape {tuple(np.shape(tensor))} does not "
                      f"fit this {config.model_type} config (as {'/'.join(key)}: "
                      f"{shapes[key].shape if key in shapes else 'no such parameter'})")
    buffer = host_buffer(shapes[key].shape, dtype)
    buffer[...] = tensor
    params[key] = to_device(buffer)
    filled.add(key)
  missing = sorted("/".join(k) for k in set(shapes) - filled)
  if missing:
    raise UserError(f"{weights}: the weights lack {len(missing)} parameters of this "
                    f"{config.model_type} config, e.g. {missing[:3]}")
  return model, unflatten_dict(params)
