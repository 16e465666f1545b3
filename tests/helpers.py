"""Plain helpers shared by the test modules (no torch): the exact denoiser of Gaussian data with
its posterior variance, and the toy MLP training problem's pieces (denoiser, train section).

Imported as ``import helpers`` (pytest puts tests/ on sys.path: it holds conftest.py and no
__init__.py)."""
import os

import jax
import jax.numpy as jnp
import ml_collections

from mcm_jax import parameterization, schedules
from mcm_jax.models.mlp import MLPDenoiser
from mcm_jax.samplers import addim


def xla_flags(devices=0):
  """The test session's XLA_FLAGS (conftest.py: backend optimisation off) for a subprocess, with
  ``devices`` fake CPU devices (0: XLA's default, one)."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + ([f"--xla_force_host_platform_device_count={devices}"]
                          if devices else []))


def LOGSNR(t):  # pylint: disable=invalid-name
  """The cosine schedule every toy test uses."""
  return schedules.cosine_logsnr(t)


def gaussian_denoiser(scale, logsnr_fn=LOGSNR):
  """Exact E[x | z_t] for x ~ N(0, scale^2 I): alpha scale^2 / (alpha^2 scale^2 + sigma^2) z,
  as ``f(z, t)`` (the samplers' signature)."""
  def f(z, t):
    alpha, sigma = schedules.alpha_sigma(logsnr_fn(t))
    c = alpha * scale ** 2 / (alpha ** 2 * scale ** 2 + sigma ** 2)
    return addim.bcast(c, z) * z
  return f


def gaussian_denoise_fn(scale, logsnr_fn=LOGSNR):
  """The same exact denoiser with the losses' ``denoise_fn(params, z, t, cond, rng)`` signature
  (params, cond and rng are ignored)."""
  f = gaussian_denoiser(scale, logsnr_fn)
  return lambda params, z, t, cond=None, rng=None: f(z, t)


def gaussian_posterior_var(scale, alpha, sigma):
  """Var[x | z_t] per dimension for x ~ N(0, scale^2 I)."""
  return scale ** 2 * sigma ** 2 / (alpha ** 2 * scale ** 2 + sigma ** 2)


def mlp_denoiser(hidden, depth, dim):
  """The toy MLP (v-prediction on the cosine schedule) as ``(denoise_fn, params)``; params from
  PRNGKey(0) for ``dim``-dimensional data."""
  model = MLPDenoiser(hidden=hidden, depth=depth)
  denoise = parameterization.make_denoiser(
      lambda p, z, logsnr, cond, rng: model.apply(p, z, logsnr), LOGSNR, "v")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, dim)), jnp.zeros((1,)))
  return denoise, params


def train_config(steps, log_every, checkpoint_every, learning_rate, warmup_steps,
                 batch_size=64):
  """A ``config.train`` section for ``train.train`` on the toy problems (EMA 0.9, clip 1.0)."""
  return ml_collections.ConfigDict(dict(
      steps=steps, batch_size=batch_size, log_every=log_every,
      checkpoint_every=checkpoint_every, keep_checkpoints=3, ema_decay=0.9, seed=0,
      optim=dict(learning_rate=learning_rate, warmup_steps=warmup_steps, grad_clip=1.0, b1=0.9,
                 b2=0.99, weight_decay=0.0)))


def image_folder(directory, n=6, size=20):
  """A folder of n random RGB images (size + i by size pixels) with a caption file each (the
  kohya layout ``data.image_captions`` reads); returns its path."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  directory.mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (size + i, size, 3), np.uint8)).save(
        directory / f"{i:02d}.png")
    (directory / f"{i:02d}.txt").write_text(["red house", "blue cat", "small tree"][i % 3])
  return str(directory)


def webdataset_shards(folder, directory, per_shard=2, json_captions=False):
  """The folder's images and captions written as webdataset shards (img2dataset's layout:
  ``<key>.png`` with ``<key>.txt`` or ``<key>.json``, keys in order, ``per_shard`` per shard)."""
  import json  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  directory.mkdir()
  images = sorted(folder.glob("*.png"))
  for s in range(0, len(images), per_shard):
    with tarfile.open(directory / f"{s // per_shard:05d}.tar", "w") as tar:
      for image in images[s:s + per_shard]:
        caption = (folder / f"{image.stem}.txt").read_text()
        key = f"{s // per_shard:05d}{int(image.stem.lstrip('img')):04d}"  # shard, image number
        tar.add(image, arcname=f"{key}.png")
        name, data = ((f"{key}.json", json.dumps({"caption": caption, "width": 10}))
                      if json_captions else (f"{key}.txt", caption))
        path = directory / name
        path.write_text(data)
        tar.add(path, arcname=name)
        path.unlink()
  return directory
