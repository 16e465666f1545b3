"""PNG figures: sample scatter grids, image grids and MCM Fig. 1-style trajectory panels
(matplotlib, Agg), with the dense sampler trajectories those panels draw."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from mcm_jax import schedules, storage  # noqa: E402  pylint: disable=g-import-not-at-top
from mcm_jax.errors import UserError  # noqa: E402  pylint: disable=g-import-not-at-top
from mcm_jax.samplers import addim  # noqa: E402  pylint: disable=g-import-not-at-top


def scatter_grid(path, rows, reference=None, max_points=4000, lim=2.2):
  """``rows``: {row title: {column title: [N, 2] samples}}; one scatter panel per entry.

  ``reference`` ([N, 2] data) is drawn first as a separate row."""
  if reference is not None:
    rows = {"data": {"": reference}, **rows}
  ncols = max(len(r) for r in rows.values())
  fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.2 * len(rows)),
                           squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  for i, (row_title, panels) in enumerate(rows.items()):
    for j, (col_title, pts) in enumerate(panels.items()):
      pts = np.asarray(pts)[:max_points]
      ax = axes[i, j]
      ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.5, color="C0" if i else "k")
      ax.set_xlim(-lim, lim)
      ax.set_ylim(-lim, lim)
      ax.set_aspect("equal")
      ax.set_title(f"{row_title} {col_title}".strip(), fontsize=8)
  _save_figure(fig, path)


def trajectory_panels(path, panels, data=None):
  """MCM Fig. 1: ``panels`` = [(title, t [P], z [P, M])] of M 1-D trajectories sampled at P
  times. t runs down the page from 0 (data, top) to 1 (noise, bottom); ``data`` [N] is shown
  as a histogram above each panel's t=0 line."""
  fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 4.0), sharey=True,
                           squeeze=False)
  for ax, (title, t, z) in zip(axes[0], panels):
    t, z = np.asarray(t), np.asarray(z)
    ax.plot(z, t, color="C0", lw=0.4, alpha=0.35)
    ax.scatter(z[-1], t[-1] * np.ones(z.shape[1]), s=2, color="C3", zorder=3)
    if data is not None:
      hist, edges = np.histogram(np.asarray(data), bins=80, range=(-3, 3), density=True)
      ax.fill_between(0.5 * (edges[1:] + edges[:-1]), -0.12 * hist / hist.max(), 0,
                      color="0.6", step="mid")
    ax.set_ylim(1.02, -0.14)
    ax.set_xlim(-3, 3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("z")
  axes[0, 0].set_ylabel("t  (0 = data, 1 = noise)")
  _save_figure(fig, path)


def to_uint8(images):
  """Images in [-1, 1] -> the uint8 pixels a PNG holds: ``round(clip((x + 1) 127.5, 0, 255))``."""
  return np.round(np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255)).astype(np.uint8)


def image_grid(path, images, ncols=None):
  """Saves [N, H, W, C] images in [-1, 1] (C = 1 or 3) as one PNG grid."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.zeros((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  scale = max(1, 512 // max(grid.shape[:2]))
  grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
  write_png(path, grid)


def save_image(path, image):
  """Saves one [H, W, C] image in [-1, 1] as a PNG at its own size."""
  write_png(path, to_uint8(image))


def write_png(path, pixels):
  """Writes [H, W, C] (C = 1 or 3) or [H, W] uint8 ``pixels`` as a PNG at ``path`` (a local
  path or an object-store URL, ``mcm_jax.storage``)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.asarray(pixels)
  image = Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1
                          else pixels)
  storage.write_with(path, lambda f: image.save(f, format="PNG"))


def read_image(path, size, resize=True):
  """An image file (local or object-store path) as [size, size, 3] float32 in [-1, 1]: RGB,
  resized with Lanczos as diffusers' image processor does (no crop); with ``resize=False`` an
  image of another size is a UserError naming it."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not storage.isfile(path):
    raise FileNotFoundError(f"image {path!r} not found")
  try:
    image = Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB")
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
  if not resize and image.size != (size, size):
    raise UserError(f"{path}: a {image.size[0]}x{image.size[1]} image; allowed: {size}x{size} "
                    "(the --resolution)")
  image = image.resize((size, size), Image.LANCZOS)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def metric_curves(path, curves, references=None):
  """One panel per metric: each of ``curves`` ({label: {steps (str): {metric: value}}}) against
  steps (log2 axis), each of ``references`` ({name: {metric: value}}, e.g. the guided teacher) a
  dashed line."""
  first = next(iter(next(iter(curves.values())).values()))
  metrics = [m for m in first if m != "num"]
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
  styles = ["--", ":", "-."]
  for ax, metric in zip(axes[0], metrics):
    for label, curve in curves.items():
      steps = sorted(curve, key=int)
      ax.plot([int(s) for s in steps], [curve[s][metric] for s in steps], "o-", label=label)
    for i, (name, row) in enumerate((references or {}).items()):
      if metric in row:
        ax.axhline(row[metric], ls=styles[i % len(styles)], color="gray", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("steps")
    ax.set_title(metric)
  axes[0][0].legend(fontsize=7)
  _save_figure(fig, path)


def _save_figure(fig, path):
  fig.tight_layout()
  storage.write_with(path, lambda f: fig.savefig(f, dpi=110, format="png"))
  plt.close(fig)


def dense_trajectories(f, z, num_steps, logsnr_fn, points_per_step):
  """Trajectories of the multistep sampler with each step drawn as its DDIM path
  ``u -> DDIM_{t->u}(x_hat(z_t), z_t)`` for u from t to s. Returns (t [P], z [P, M])."""
  ts, zs = [1.0], [z[:, 0]]
  for i in range(num_steps):
    t, s = 1.0 - i / num_steps, 1.0 - (i + 1) / num_steps
    tb = jnp.full(z.shape[:1], t)
    x_hat = f(z, tb)
    a_t, s_t = schedules.alpha_sigma(logsnr_fn(tb))
    for u in np.linspace(t, s, points_per_step + 1)[1:]:
      a_u, s_u = schedules.alpha_sigma(logsnr_fn(jnp.full(z.shape[:1], u)))
      z_u = x_hat if i == num_steps - 1 and u == s else addim.ddim_step(
          x_hat, z, a_t, s_t, a_u, s_u)
      ts.append(u)
      zs.append(z_u[:, 0])
    z = z_u
  return np.array(ts), np.stack(zs)
