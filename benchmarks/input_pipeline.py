"""Image input throughput: ImageNet-sized JPEGs in an array_record tfds directory, read at 64 and
128 px by the hand-written reader the package had (a 16-thread pool decoding each batch) and by
``mcm_jax.data.loader`` (grain: reading threads, 0-2 worker processes), full and draft-mode JPEG
decoding. Prints one JSON line: images/s, CPU-seconds per image (all processes), the pixel
difference draft mode makes, and the machine.

python benchmarks/input_pipeline.py [--images 512] [--batch 128] [--steps 16] [--warmup 8]
    [--dir DIR]

The JPEGs are 500 x 375 (ImageNet's most common size) of a synthetic scene (smooth colour fields,
edges and grain) at quality 90, ~110 KB each like ImageNet's; they are written once into DIR
(default: a temporary directory).
"""
import argparse
import concurrent.futures
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
import psutil
from PIL import Image

from mcm_jax.data import images, loader

NAME = "jpeg_bench"


def scene(rng, w=500, h=375):
  """uint8 [h, w, 3]: low-frequency colour fields, a few hard edges, and pixel grain."""
  coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
  field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC),
                     np.float32)
  yy, xx = np.mgrid[:h, :w]
  for _ in range(6):  # half-planes with their own tint
    a, b, c = rng.normal(size=3)
    field += np.where(a * (xx - w / 2) + b * (yy - h / 2) > c * 100, 1, 0)[..., None] * \
        rng.uniform(-40, 40, 3)
  field += rng.normal(0, 26, field.shape)
  return np.clip(field, 0, 255).astype(np.uint8)


def builder(n):
  """A tfds builder of ``n`` JPEG scenes with ImageNet's features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class JpegBench(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(n)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(0)
      for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(scene(rng)).save(buf, format="JPEG", quality=90)
        buf.seek(0)
        yield i, {"image": buf, "label": i % 1000}

  JpegBench.name = NAME
  return JpegBench


def cpu_seconds():
  """User + system CPU seconds of this process and its live children."""
  procs = [psutil.Process()] + psutil.Process().children(recursive=True)
  total = 0.0
  for p in procs:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def thread_pool_reader(source, batch, seed):
  """The package's earlier reader: each batch decoded by a pool of 16 threads, the next batch
  read ahead by one more thread."""
  pool, ahead = concurrent.futures.ThreadPoolExecutor(16), concurrent.futures.ThreadPoolExecutor(1)
  pending = {}

  def read(step):
    examples = list(pool.map(source.__getitem__, loader.epoch_indices(step, batch, len(source),
                                                                      seed)))
    return {"x": np.stack([e["x"] for e in examples])}

  def batch_fn(step):
    future = pending.pop(step, None) or ahead.submit(read, step)
    pending[step + 1] = ahead.submit(read, step + 1)
    return future.result()

  batch_fn.close = lambda: None
  return batch_fn


def measure(make, steps, warmup):
  """(images per second, CPU milliseconds per image) of ``steps`` batches read after ``warmup``
  batches (start-up and filling the read-ahead buffers are not timed)."""
  batch_fn = make()
  try:
    n = sum(len(batch_fn(step)["x"]) for step in range(warmup)) // warmup
    cpu, start = cpu_seconds(), time.perf_counter()
    for step in range(warmup, warmup + steps):
      batch_fn(step)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
  finally:
    batch_fn.close()
  return round(n * steps / wall, 1), round(cpu / (n * steps) * 1e3, 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--warmup", type=int, default=8)
  parser.add_argument("--dir", default="")
  args = parser.parse_args()
  data_dir = args.dir or tempfile.mkdtemp(prefix="jpeg_bench_")
  if not os.path.isdir(os.path.join(data_dir, NAME)):
    builder(args.images)(data_dir=data_dir, file_format="array_record").download_and_prepare()
  raw = images.load(NAME, 64, data_dir).source
  kb = np.mean([len(raw[i]["image"]) for i in range(min(64, len(raw)))]) / 1e3
  rows = []
  for res in (64, 128):
    for draft in (False, True):
      source = images.load(NAME, res, data_dir, jpeg_draft=draft)
      readers = {"thread_pool_16": lambda s=source: thread_pool_reader(s, args.batch, 0)}
      for workers, threads in ((0, 4), (1, 4), (2, 4)):
        readers[f"grain_w{workers}_t{threads}"] = (
            lambda s=source, w=workers, t=threads: loader.host_batch_fn(s, args.batch, 0, w, t))
      for name, make in readers.items():
        if draft and name != "thread_pool_16" and not name.startswith("grain_w2"):
          continue  # draft mode: the old reader and grain's fastest setting
        per_s, cpu_ms = measure(make, args.steps, args.warmup)
        rows.append(dict(resolution=res, jpeg_draft=draft, reader=name, images_per_s=per_s,
                         cpu_ms_per_image=cpu_ms))
        print(json.dumps(rows[-1]), flush=True)
  # What draft mode does to the pixels: the same images through both decoders.
  drafts = {}
  for res in (64, 128):
    full = loader.read(images.load(NAME, res, data_dir), range(64))["x"]
    draft = loader.read(images.load(NAME, res, data_dir, jpeg_draft=True), range(64))["x"]
    diff = np.abs(full - draft) * 127.5  # in 8-bit levels
    mse = float(np.mean(((full - draft) * 127.5) ** 2))
    drafts[res] = dict(mean_abs_levels=round(float(diff.mean()), 2),
                       max_abs_levels=round(float(diff.max()), 1),
                       psnr_db=round(10 * np.log10(255 ** 2 / mse), 1))
  print(json.dumps({"benchmark": "input_pipeline", "jpeg_kb": round(kb, 1),
                    "jpeg_size": "500x375", "batch": args.batch, "steps": args.steps,
                    "warmup": args.warmup,
                    "rows": rows, "draft_vs_full": drafts,
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "processor": platform.processor()}}))


if __name__ == "__main__":
  main()
