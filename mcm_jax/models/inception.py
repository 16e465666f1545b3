"""Inception-v3 as used for FID (the TF 2015-12-05 graph, as ported by pytorch-fid), in Flax.

``InceptionFID()(x [N, H, W, 3] in [-1, 1]) -> pool3 features [N, 2048]``: bilinear resize to
299x299 (half-pixel centres, no antialiasing: ``F.interpolate(align_corners=False)``), then
torchvision's Inception-v3 trunk up to the final average pool with pytorch-fid's patches (average
pools that exclude padding; max pool in the last block). Module and parameter names follow the
PyTorch ones so the standard weights (``pt_inception-2015-12-05-6726825d.pth``) map one to one:
``Mixed_5b.branch1x1.conv.weight [O, I, kh, kw]`` -> ``params/Mixed_5b/branch1x1/conv/kernel
[kh, kw, I, O]``; batch-norm statistics live in ``params`` too (frozen, eps = 1e-3).
tests/test_inception.py checks equality with pytorch-fid's network on the same random weights.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax.errors import MissingExtraError, UserError

_HIGHEST = jax.lax.Precision.HIGHEST


class FrozenBatchNorm(nn.Module):
  """``(x - mean) / sqrt(var + eps) * scale + bias`` with stored statistics."""
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale, bias = self.param("scale", nn.initializers.ones, (c,)), self.param(
        "bias", nn.initializers.zeros, (c,))
    mean, var = self.param("mean", nn.initializers.zeros, (c,)), self.param(
        "var", nn.initializers.ones, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) -> batch norm -> ReLU."""
  features: int
  kernel: tuple = (1, 1)
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.stride, use_bias=False, precision=_HIGHEST,
                padding=[(p, p) for p in self.padding], name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3(x, stride):
  pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3(x, 2)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3(x, 2)], -1)


class InceptionE(nn.Module):
  max_pool: bool  # FID's last block (Mixed_7c) max-pools its pool branch

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, **row, name="branch3x3_2a")(b3),
                          BasicConv(384, **col, name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
                          BasicConv(384, **col, name="branch3x3dbl_3b")(bd)], -1)
    pooled = _max3(x, 1) if self.max_pool else _avg3(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionFID(nn.Module):
  """``x [N, H, W, 3] in [-1, 1] -> [N, 2048]`` (pool3 features of the FID network)."""

  @nn.compact
  def __call__(self, x):
    x = jax.image.resize(x.astype(jnp.float32), (x.shape[0], 299, 299, x.shape[-1]), "bilinear",
                         antialias=False)
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3(x, 2)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max3(x, 2)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def params_from_torch_state_dict(state_dict):
  """Flax params from a torchvision-named Inception state dict ({name: array}); the classifier
  (``fc.*``), ``AuxLogits.*`` and ``num_batches_tracked`` entries are ignored. Raises ValueError
  naming any missing, unexpected or mis-shaped entry."""
  like = jax.eval_shape(InceptionFID().init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 75, 75, 3)))["params"]
  expected = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(like):
    names = [p.key for p in path]
    *module, layer, leaf_name = names
    if layer == "conv":
      key = ".".join(module + ["conv", "weight"])
    else:
      key = ".".join(module + ["bn", {v: k for k, v in _BN_NAMES.items()}[leaf_name]])
    expected[key] = (names, leaf.shape)
  ignored = ("fc.", "AuxLogits.")
  given = {k: np.asarray(v) for k, v in state_dict.items()
           if not k.startswith(ignored) and not k.endswith("num_batches_tracked")}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  if missing or unexpected:
    raise UserError(f"not the FID Inception-v3 state dict: missing {missing[:5]} "
                    f"({len(missing)} in all), unexpected {unexpected[:5]} "
                    f"({len(unexpected)} in all)")
  params = {}
  for key, (names, shape) in expected.items():
    value = given[key].astype(np.float32)
    if value.ndim == 4:  # [O, I, kh, kw] -> [kh, kw, I, O]
      value = value.transpose(2, 3, 1, 0)
    if value.shape != tuple(shape):
      raise UserError(f"Inception weight {key}: shape {given[key].shape} does not give the "
                      f"expected {tuple(shape)}")
    node = params
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jnp.asarray(value)
  return {"params": params}


def load_params(path):
  """FID Inception weights from a local file: the standard ``pt_inception-2015-12-05-*.pth``
  (needs torch; read with ``weights_only=True``) or an ``.npz`` of the same state dict
  (``np.savez(out, **{k: v.numpy() for k, v in sd.items()})``, no torch needed)."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"FID Inception weights {path!r} not found; pass a local copy of "
                            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) or an "
                            ".npz of its state dict (nothing is downloaded)")
  if path.endswith(".npz"):
    with np.load(path) as f:
      return params_from_torch_state_dict(dict(f))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingExtraError(f"reading {path} needs torch; or convert it to .npz where torch is "
                            "installed (see mcm_jax/models/inception.py)") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return params_from_torch_state_dict({k: v.numpy() for k, v in state_dict.items()})
