"""Fréchet distances in a feature space: FID (Inception pool3) and, for the CPU digits demo,
FD in the hidden layer of a small digits classifier.

``FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` between Gaussians fitted to two
feature sets (covariances with ddof = 1, as pytorch-fid). Statistics files are ``.npz`` with
``mu`` and ``sigma`` (pytorch-fid's format, so its precomputed files work) plus ``num``.
Images enter the pixel models' feature functions as [N, H, W, C] in [-1, 1] and are first
quantised to 8 bits, as a saved PNG would be (pytorch-fid's convention: the network resizes
bilinearly to 299 px). Text-to-image FID (``t2i_eval``) follows clean-fid's instead: 8-bit images,
a float bicubic resize to 299 px, TF's input scaling (``clean_resize``,
``clean_inception_feature_fn``).
"""
import io
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import seeds, storage
from mcm_jax.data import loader
from mcm_jax.errors import UserError

FEATURES = ("inception", "digits_classifier")


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """FD of two Gaussians, float64. ``tr (S1 S2)^{1/2} = tr (A S2 A)^{1/2}`` with ``A = S1^{1/2}``
  (symmetric PSD square roots by eigh: no complex parts, no sqrtm iterations)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise UserError(f"feature statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                    f"sigma {s1.shape} vs {s2.shape}")
  w, u = np.linalg.eigh(s1)
  a = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
  cross = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def statistics(features):
  """(mu, sigma) of [N, D] features, float64, sigma with ddof = 1."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise UserError(f"need [N >= 2, D] features, got shape {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def save_statistics(path, mu, sigma, num):
  storage.makedirs(storage.dirname(path))
  storage.write_with(path, lambda f: np.savez(f, mu=mu, sigma=sigma, num=num))


def load_statistics(path):
  """(mu, sigma) from an ``.npz`` with ``mu`` and ``sigma``; errors name the path and keys."""
  if not storage.isfile(path):
    raise FileNotFoundError(f"reference statistics {path!r} not found")
  with np.load(io.BytesIO(storage.read_bytes(path))) as f:
    if "mu" not in f or "sigma" not in f:
      raise UserError(f"{path}: reference statistics need arrays 'mu' and 'sigma'; found "
                      f"{sorted(f.keys())}")
    return f["mu"], f["sigma"]


def quantize(images):
  """[-1, 1] -> the 256 levels a uint8 PNG holds, back in [-1, 1]."""
  return jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5) / 127.5 - 1


def inception_feature_fn(weights_path):
  """``f(images [N, H, W, 3] in [-1, 1]) -> [N, 2048]`` Inception pool3 features (jitted)."""
  from mcm_jax.models import inception  # pylint: disable=g-import-not-at-top
  params = inception.load_params(weights_path)
  net = inception.InceptionFID()

  @jax.jit
  def apply(p, images):  # the weights are an argument, not constants baked into the program
    return net.apply(p, quantize(images))

  def features(images):
    if images.shape[-1] != 3:
      raise UserError(f"FID Inception needs 3-channel images, got shape {images.shape}")
    return apply(params, images), None

  return features


def digits_feature_fn(seed=0):
  """``f(images [N, 8k, 8k, 1] in [-1, 1]) -> ([N, 128] hidden ReLU features, [N, 10] logits)``
  of an MLP classifier fitted by scikit-learn on the 1,797 8x8 digits (inputs are average-pooled
  back to 8x8). A stand-in for Inception where no pretrained network exists: it only means something
  for the digits data."""
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  from mcm_jax.data.images import load_digits  # pylint: disable=g-import-not-at-top
  x, y = load_digits(8)
  clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=400, random_state=seed)
  clf.fit(x.reshape(len(x), -1), y)
  (w1, w2), (b1, b2) = [jnp.asarray(w, jnp.float32) for w in clf.coefs_], [
      jnp.asarray(b, jnp.float32) for b in clf.intercepts_]

  @jax.jit
  def features(images):
    n, h, w, c = images.shape
    if c != 1 or h % 8 or h != w:
      raise UserError(f"digits features need [N, 8k, 8k, 1] images, got shape {images.shape}")
    k = h // 8
    x8 = quantize(images).reshape(n, 8, k, 8, k).mean((2, 4)).reshape(n, 64)
    hidden = jax.nn.relu(x8 @ w1 + b1)
    return hidden, hidden @ w2 + b2

  return features


def make_feature_fn(name, weights_path=""):
  if name == "inception":
    return inception_feature_fn(weights_path)
  if name == "digits_classifier":
    return digits_feature_fn()
  raise UserError(f"features={name!r} is not known; allowed: {FEATURES}")


def batched_features(feature_fn, images, batch_size):
  """(features [N, D] float64, logits or None) of host images, in fixed-size batches (the last
  one padded, so ``feature_fn`` compiles once)."""
  feats, logits = [], []
  n = len(images)
  for start in range(0, n, batch_size):
    chunk = np.asarray(images[start:start + batch_size])
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    f, l = feature_fn(jnp.asarray(chunk))
    feats.append(np.asarray(f, np.float64)[:batch_size - pad])
    if l is not None:
      logits.append(np.asarray(l)[:batch_size - pad])
  return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def reference_statistics(source, feature_fn, cache_path, num, batch_size, seed):
  """(mu, sigma) of the features of ``num`` data images of ``source`` (a seeded subset, read
  one batch at a time), cached in ``cache_path`` and reused from there."""
  if storage.isfile(cache_path):
    return load_statistics(cache_path)
  n = min(num, len(source))
  subset = loader.subset_indices(len(source), n, seeds.entropy(seed, "fid_reference"))
  feats = []
  for start in range(0, n, batch_size):
    images = loader.read(source, subset[start:start + batch_size])["x"]
    feats.append(batched_features(feature_fn, images, batch_size)[0])
  mu, sigma = statistics(np.concatenate(feats))
  if jax.process_index() == 0:
    save_statistics(cache_path, mu, sigma, n)
  logging.info("reference statistics of %d images -> %s", n, cache_path)
  return mu, sigma


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_SIZE = 299


def clean_inception_feature_fn(weights_path):
  """``f(pixels [N, 299, 299, 3], float 0..255) -> [N, 2048]``: clean-fid's convention for the
  FID network (TF's graph: ``(x - 128) / 128``, no re-quantisation; pixels made by
  ``clean_resize``), jitted."""
  from mcm_jax.models import inception  # pylint: disable=g-import-not-at-top
  params = inception.load_params(weights_path)
  net = inception.InceptionFID()
  apply = jax.jit(lambda p, pixels: net.apply(p, (pixels - 128.0) / 128.0))

  def features(pixels):
    if pixels.shape[1:] != (INCEPTION_SIZE, INCEPTION_SIZE, 3):
      raise UserError(f"clean-fid features need [N, {INCEPTION_SIZE}, {INCEPTION_SIZE}, 3] "
                      f"pixels (clean_resize), got shape {pixels.shape}")
    return apply(params, pixels), None

  return features


def to_inception_size(images):
  """[N, H, W, 3] in [-1, 1] -> [N, 299, 299, 3] float pixels in [0, 255]: quantised to 8 bits
  (as a saved PNG), then ``clean_resize``."""
  from mcm_jax import plotting  # pylint: disable=g-import-not-at-top
  return np.stack([clean_resize(p) for p in plotting.to_uint8(images)])


def clean_resize(pixels):
  """One [H, W, 3] uint8 image -> [299, 299, 3] float32 in [0, 255]: clean-fid's 'clean' resize,
  each channel as a float32 image (mode F) through PIL's bicubic filter, clipped, not quantised."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  size = (INCEPTION_SIZE, INCEPTION_SIZE)
  channels = [np.asarray(Image.fromarray(pixels[..., c].astype(np.float32)).resize(
      size, Image.BICUBIC)) for c in range(3)]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.float32)


def folder_statistics(directory, feature_fn, batch_size=32, limit=None):
  """(mu, sigma, n) of the clean-fid features (``clean_inception_feature_fn``) of the images in
  ``directory`` (sorted names, ``IMAGE_SUFFIXES``; RGB; each through ``clean_resize``), read one
  batch at a time."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not storage.isdir(directory):
    raise FileNotFoundError(f"FID reference folder {directory!r} not found")
  names = sorted(n for n in storage.listdir(directory) if n.lower().endswith(IMAGE_SUFFIXES))
  names = names[:limit] if limit else names
  if len(names) < 2:
    raise UserError(f"FID reference folder {directory!r} holds {len(names)} images "
                    f"({'/'.join(IMAGE_SUFFIXES)}); allowed: at least 2 (thousands for a "
                    "meaningful FID)")
  feats = []
  for start in range(0, len(names), batch_size):
    batch = []
    for name in names[start:start + batch_size]:
      image = Image.open(storage.reader(f"{directory}/{name}")).convert("RGB")
      batch.append(clean_resize(np.asarray(image)))
    feats.append(batched_features(feature_fn, np.stack(batch), batch_size)[0])
  mu, sigma = statistics(np.concatenate(feats))
  return mu, sigma, len(names)

