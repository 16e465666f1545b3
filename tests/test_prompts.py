"""Prompt files (.txt / .jsonl / .parquet) and deterministic prompt batches."""
import json

import numpy as np
import pytest

from mcm_jax.data import prompts


def test_prompt_files_in_three_formats(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  want = ["a red fox", "a blue house", "two cats"]
  (tmp_path / "p.txt").write_text("a red fox\n\n a blue house \ntwo cats\n")
  (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"caption": p, "id": i})
                                              for i, p in enumerate(want)) + "\n")
  pq.write_table(pa.table({"prompt": want, "score": [6.5, 7.0, 6.1]}), tmp_path / "p.parquet")
  for ext in ("txt", "jsonl", "parquet"):
    assert prompts.load_prompts(str(tmp_path / f"p.{ext}")) == want, ext
  (tmp_path / "bad.jsonl").write_text(json.dumps({"url": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: no field of \('prompt', 'caption'"):
    prompts.load_prompts(str(tmp_path / "bad.jsonl"))
  with pytest.raises(ValueError, match="extension '.csv'"):
    (tmp_path / "p.csv").write_text("x")
    prompts.load_prompts(str(tmp_path / "p.csv"))
  with pytest.raises(FileNotFoundError, match="prompt file"):
    prompts.load_prompts(str(tmp_path / "none.txt"))


def test_prompt_batches_are_epochs():
  texts = [f"p{i}" for i in range(6)]
  batch = prompts.host_batch_fn(texts, lambda ps: {"ids": np.array([int(p[1:]) for p in ps])},
                                4, seed=0)
  seen = np.concatenate([batch(s)["ids"] for s in range(3)])  # 12 = two epochs
  assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
  np.testing.assert_array_equal(batch(2)["ids"], batch(2)["ids"])


def test_cached_encoder_equals_the_encoder_and_respects_its_budget():
  """sdxl_mlcm.cached_encoder: the same embeddings as the encoder for any batch of the prompts
  (and ""), computed once; past the budget the encoder itself is kept."""
  from mcm_jax.experiments import sdxl_mlcm  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl_text  # pylint: disable=g-import-not-at-top
  encode = sdxl_text.hashed_text_encoder(16, 8)
  calls = []
  counted = lambda texts: (calls.append(len(texts)), encode(texts))[1]
  prompts = [f"a photo of thing {i}" for i in range(11)]
  cached = sdxl_mlcm.cached_encoder(counted, prompts, batch=4)
  assert sum(calls) == 1 + 12  # the size probe, then every prompt and "" once
  batch = [prompts[3], "", prompts[10], prompts[3]]
  for key, want in encode(batch).items():
    np.testing.assert_array_equal(cached(batch)[key], want)
  assert sum(calls) == 13  # lookups do not encode
  assert sdxl_mlcm.cached_encoder(counted, prompts, budget=1000) is counted


def test_coco_captions_pick_one_caption_per_chosen_image(tmp_path):
  annotations = [{"image_id": i // 5, "id": i, "caption": f"image {i // 5} caption {i % 5} "}
                 for i in range(50)]  # 10 images, 5 captions each
  path = tmp_path / "captions_val2017.json"
  path.write_text(json.dumps({"images": [], "annotations": annotations}))
  picked = prompts.coco_captions(str(path), 4, seed=3)
  assert len(picked) == 4 and picked == prompts.coco_captions(str(path), 4, seed=3)
  images = [int(p.split()[1]) for p in picked]
  assert images == sorted(set(images))  # 4 distinct images, in image-id order
  assert picked != prompts.coco_captions(str(path), 4, seed=4)
  assert all(p == p.strip() for p in picked)
  with pytest.raises(ValueError, match="num_prompts=11 is more than the 10 images"):
    prompts.coco_captions(str(path), 11)
  (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
  with pytest.raises(ValueError, match="not a COCO captions file"):
    prompts.coco_captions(str(tmp_path / "bad.json"))
