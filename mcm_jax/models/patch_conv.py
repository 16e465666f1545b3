"""Convolutions whose kernel outweighs their input patches, computed on CPU as one matrix product.

A 2-D convolution with kernel ``[kh, kw, c_in, c_out]`` and ``m`` output pixels is the product
``patches @ kernel.reshape(kh kw c_in, c_out)``, where ``patches [m, kh kw c_in]`` holds each
output pixel's receptive field (im2col). XLA:CPU's convolution is slow where ``m <= c_out``
(SDXL's 8 x 8 and 16 x 16 levels at 256 px: few pixels, 640-2560 channels); there the patches are
no larger than the kernel and the product is the faster form. ``conv`` chooses by platform
(``lax.platform_dependent``): the product on CPU where ``m <= c_out``, XLA's convolution on every
other platform and shape, so a program compiled for TPU or GPU is unchanged.

``on_cpu`` is a Flax method interceptor that computes every bound ``nn.Conv`` it supports (2-D,
NHWC, no dilation or feature groups, explicit or 'VALID' padding) with ``conv``; any other
convolution runs as Flax's.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_NHWC = ("NHWC", "HWIO", "NHWC")


def patches_dot(x, kernel, strides, padding, precision=None):
  """The convolution of ``x [B, H, W, c_in]`` with ``kernel [kh, kw, c_in, c_out]`` (``strides``
  (sh, sw), ``padding`` ((top, bottom), (left, right))) as ``patches @ kernel``: patches
  ``[B, Ho, Wo, kh kw c_in]`` ordered (row, column, channel), as the kernel's reshape is."""
  kh, kw, c_in, c_out = kernel.shape
  (sh, sw), ((top, bottom), (left, right)) = strides, padding
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  patches = jnp.concatenate([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                             for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out), precision=precision)


def conv(x, kernel, strides, padding, precision=None):
  """``lax.conv_general_dilated`` (NHWC / HWIO), as ``patches_dot`` when compiled for CPU and the
  output has no more pixels than channels (``B Ho Wo <= c_out``)."""
  xla = lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision)
  kh, kw, _, c_out = kernel.shape
  pixels = x.shape[0] * np.prod([(size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in zip(
      x.shape[1:3], padding, (kh, kw), strides)])
  if pixels > c_out:
    return xla(x, kernel)
  return jax.lax.platform_dependent(
      x, kernel, cpu=lambda x, kernel: patches_dot(x, kernel, strides, padding, precision),
      default=xla)


def _supported(module, x):
  """(strides, padding) of a bound ``nn.Conv`` that ``conv`` computes as Flax does, else None."""
  if (isinstance(module.kernel_size, int) or len(module.kernel_size) != 2 or x.ndim != 4
      or module.feature_group_count != 1 or module.mask is not None
      or module.conv_general_dilated_cls is not None
      or module.conv_general_dilated is not None
      or any(d not in (None, 1, (1, 1)) for d in (module.input_dilation, module.kernel_dilation))
      or not module.has_variable("params", "kernel")):
    return None
  strides = module.strides or 1
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  padding = nn.linear.canonicalize_padding(module.padding, 2)
  if padding == "VALID":
    padding = ((0, 0), (0, 0))
  elif isinstance(padding, str):
    return None
  return strides, tuple(tuple(p) for p in padding)


def on_cpu(next_fun, args, kwargs, context):
  """A Flax method interceptor: a bound ``nn.Conv`` that ``_supported`` accepts returns
  ``conv(x, kernel) + bias`` (Flax's dtype promotion and precision); anything else, or stored
  parameters of another shape than the module's, is Flax's own call."""
  module = context.module
  if context.method_name != "__call__" or type(module) is not nn.Conv or kwargs or len(args) != 1:
    return next_fun(*args, **kwargs)
  layout = _supported(module, args[0])
  if layout is None:
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  if (kernel.shape != (*module.kernel_size, args[0].shape[-1], module.features)
      or (bias is not None and bias.shape != (module.features,))):
    return next_fun(*args, **kwargs)  # Flax names the parameter and both shapes
  x, kernel, bias = module.promote_dtype(args[0], kernel, bias, dtype=module.dtype)
  y = conv(x, kernel, *layout, precision=module.precision)
  return y if bias is None else y + bias
