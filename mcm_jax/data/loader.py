"""Host batches read by grain: ``batch(step)`` is this process's slice of the step's global batch.

The index rule: the global batch of step ``s`` is the examples at stream positions
``[s B, (s + 1) B)``; position ``p`` is example ``perm_e[p mod n]`` of epoch ``e = p // n``, with
``perm_e`` a fresh permutation of the ``n`` examples from (seed, e) (``epoch_indices``). Process
``i`` of ``P`` reads rows ``[i B / P, (i + 1) B / P)`` of every global batch (``process_rows``).
A batch is therefore a function of (seed, step) alone: the data position *is* the step that
every checkpoint stores, so a resumed run reads exactly what an uninterrupted one would, with
any number of reading threads or worker processes.

The reading (``host_batch_fn``) is a grain pipeline: a ``MapDataset`` whose element ``s`` is
this process's batch of step ``s`` (each example ``source[index]``, decoded by the source),
iterated from the first step asked for with ``threads`` threads each reading a batch ahead
(``grain.ReadOptions``; 0: read when asked for) and, with ``workers`` > 0, in that many worker
processes (``mp_prefetch``; each builds whole batches, so the batches do not depend on the
count).
A source is anything with ``len(source)`` and ``source[i] -> {'x': array, 'label': ...}``
(grain's random-access data source protocol).
"""
import functools

import grain
import jax
from absl import flags
import numpy as np

from mcm_jax.errors import UserError

MAX_STEPS = 2 ** 40  # the stream's length in steps: unbounded in practice


def epoch_indices(step, global_batch, n, seed):
  """Dataset indices of a step's global batch: without replacement within an epoch (a fresh
  permutation per epoch from (seed, epoch); ``seed`` an int or ``seeds.entropy(seed, name)``); a
  batch may straddle two epochs."""
  flat = step * global_batch + np.arange(global_batch)
  epochs, pos = flat // n, flat % n
  idx = np.empty(global_batch, np.int64)
  for e in np.unique(epochs):
    idx[epochs == e] = epoch_permutation(n, seed, e)[pos[epochs == e]]
  return idx


def epoch_permutation(n, seed, epoch):
  """The order of the ``n`` examples in epoch ``epoch``: a permutation from (seed, epoch), the
  last few kept (read-only): consecutive steps of an epoch share it."""
  return _permutation(int(n), tuple(np.ravel(seed).tolist()), int(epoch))


@functools.lru_cache(maxsize=4)
def _permutation(n, seed, epoch):
  perm = np.random.default_rng([*seed, epoch]).permutation(n)
  perm.setflags(write=False)
  return perm


def process_rows(global_batch):
  """(start, stop): this process's rows of a global batch split evenly over the processes."""
  procs, index = jax.process_count(), jax.process_index()
  if global_batch % procs:
    raise UserError(f"batch_size={global_batch} is not divisible by the {procs} processes")
  local = global_batch // procs
  return index * local, (index + 1) * local


def local_indices_fn(global_batch, n, seed):
  """``indices(step)``: this process's part of ``epoch_indices(step, global_batch, n, seed)``."""
  lo, hi = process_rows(global_batch)
  return lambda step: epoch_indices(step, global_batch, n, seed)[lo:hi]


def subset_indices(n_source, n, entropy):
  """Sorted indices of ``n`` of ``n_source`` examples: a random subset from ``entropy`` (an int
  or ``seeds.entropy(seed, name)``), the same on every host."""
  return np.sort(np.random.default_rng(entropy).permutation(n_source)[:n])


def _stacked(examples):
  """The examples' fields stacked: {'x': [b, ...], 'label': [b]}."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def batches(source, global_batch, seed):
  """grain ``MapDataset`` whose element ``s`` is this process's batch of step ``s``
  (``local_indices_fn``): a dict of the examples' fields stacked, e.g.
  {'x': [b, H, W, C], 'label': [b]}."""
  indices = local_indices_fn(global_batch, len(source), seed)
  return grain.MapDataset.range(MAX_STEPS).map(
      lambda step: _stacked([source[int(i)] for i in indices(step)]))


class HostBatches:
  """``batch(step)``: ``batches(...)[step]`` read ahead by a grain iterator (``threads`` threads
  per process, each reading one batch ahead; ``workers`` worker processes), passed through
  ``transform`` if given. Steps asked for in order come from one iterator; any other step
  starts a new one there (a resume)."""

  def __init__(self, source, global_batch, seed, workers=0, threads=4, transform=None):
    self.batches = batches(source, global_batch, seed)
    self.workers, self.threads, self.transform = workers, threads, transform
    self._iterator, self._next = None, None

  def _start(self, step):
    self.close()
    ds = self.batches[step:].to_iter_dataset(grain.ReadOptions(
        num_threads=self.threads, prefetch_buffer_size=self.threads))
    if self.workers:
      if not flags.FLAGS.is_parsed():  # outside an absl app (a library caller, pytest): grain
        flags.FLAGS.mark_as_parsed()   # reads its flags' defaults when it starts workers
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
    self._iterator, self._next = iter(ds), step

  def __call__(self, step):
    if step != self._next:
      self._start(step)
    self._next = step + 1
    batch = next(self._iterator)
    return batch if self.transform is None else self.transform(batch)

  def close(self):
    """Stops the reading threads and worker processes."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def host_batch_fn(source, global_batch, seed, workers=0, threads=4, transform=None):
  """``batch(step)``: this process's slice of the step's global batch (``HostBatches``)."""
  return HostBatches(source, global_batch, seed, workers, threads, transform)


def read(source, indices, threads=16):
  """The examples ``source[i]`` for ``i`` in ``indices``, stacked (read by ``threads``
  threads): e.g. {'x': [len(indices), H, W, C], 'label': [len(indices)]}."""
  indices = [int(i) for i in indices]
  ds = grain.MapDataset.source(indices).map(lambda i: source[i])
  iterator = iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=threads)).batch(len(indices)))
  try:
    return next(iterator)
  finally:
    iterator.close()
