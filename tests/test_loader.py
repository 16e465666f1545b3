"""Host batches read by grain (``mcm_jax.data.loader``): the batch of a step is the index rule's
examples (``epoch_indices``), whatever the reading threads or the step a reader starts at, and
the processes' slices make up the global batch; a trajectory bank is built by every process or by
none."""
import jax
import numpy as np
import pytest

from mcm_jax.data import images, loader


def _source(n=10):
  """Example i is the image filled with i, labelled i."""
  x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 1))
  return images.ArraySource(np.ascontiguousarray(x), np.arange(n, dtype=np.int32))


def test_batches_are_epoch_permutations_by_the_index_rule():
  batch = loader.host_batch_fn(_source(), 4, seed=3)
  seen = np.concatenate([batch(i)["label"] for i in range(5)])  # 20 = two epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert not np.array_equal(seen[:10], seen[10:])  # a fresh permutation per epoch
  # the rule itself: a permutation per epoch from (seed, epoch); step 2 straddles two epochs
  perms = [np.random.default_rng([3, e]).permutation(10) for e in (0, 1)]
  np.testing.assert_array_equal(seen, np.concatenate(perms))
  np.testing.assert_array_equal(
      seen, np.concatenate([loader.epoch_indices(i, 4, 10, 3) for i in range(5)]))
  b = batch(3)
  np.testing.assert_array_equal(b["x"][:, 0, 0, 0], b["label"])  # images stay with labels


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_a_step_read_out_of_order_is_the_same_batch(threads):
  """A resume starts reading at its step: the same batches as an uninterrupted reader."""
  want = loader.host_batch_fn(_source(), 4, seed=7, threads=0)
  reader = loader.host_batch_fn(_source(), 4, seed=7, threads=threads)
  for step in (0, 1, 2, 6, 7, 3, 3, 4):
    got = reader(step)
    np.testing.assert_array_equal(got["label"], loader.epoch_indices(step, 4, 10, 7))
    np.testing.assert_array_equal(got["x"], want(step)["x"])
  reader.close()


def test_each_process_reads_its_rows_of_the_global_batch(monkeypatch):
  whole = loader.host_batch_fn(_source(), 6, seed=1)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  parts = []
  for i in range(3):
    monkeypatch.setattr(jax, "process_index", lambda i=i: i)
    parts.append(loader.host_batch_fn(_source(), 6, seed=1))
  for step in range(4):
    np.testing.assert_array_equal(np.concatenate([p(step)["label"] for p in parts]),
                                  whole(step)["label"])
  with pytest.raises(Exception, match="batch_size=4 is not divisible by the 3 processes"):
    loader.host_batch_fn(_source(), 4, seed=1)


def test_read_returns_the_examples_in_the_order_asked():
  got = loader.read(_source(), [7, 2, 2, 9])
  np.testing.assert_array_equal(got["label"], [7, 2, 2, 9])
  assert got["x"].shape == (4, 2, 2, 1) and got["x"].dtype == np.float32


def test_every_process_builds_the_bank_when_process_0_found_none(monkeypatch, tmp_path):
  """``trajectory_bank.open_or_build`` on process 1 of 2, where process 0 has already written its
  part (``meta_p0000.json``) but, looking first, found no bank: process 0's look (broadcast)
  decides, so this process writes its part too instead of reading a partial bank."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mcm_jax.data import trajectory_bank  # pylint: disable=g-import-not-at-top
  batch = {k: np.zeros((2, 3), np.float32) for k in trajectory_bank.FIELDS}
  (tmp_path / "meta_p0000.json").write_text('{"settings": {}, "shards": []}')
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  looks = []
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: looks.append(int(x)) or np.int32(0))  # process 0: no bank
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  bank = trajectory_bank.open_or_build(str(tmp_path), {}, lambda: [batch])
  assert looks == [1]  # this process saw process 0's part, and was overruled
  assert (tmp_path / "meta_p0001.json").exists() and len(bank) == 2
