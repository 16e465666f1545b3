"""Hub model names resolved from a local Hugging Face cache that the test builds in the hub's
own layout (models--org--name/refs/main -> snapshots/<revision>/...); nothing is downloaded."""
import os
import shutil

import pytest

from mcm_jax import hub
from mcm_jax.errors import UserError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(tmp_path, name, source=None):
  cache = tmp_path / "hub"
  repo = cache / f"models--{name.replace('/', '--')}"
  snapshot = repo / "snapshots" / REVISION
  if source is None:
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
  else:
    shutil.copytree(source, snapshot)
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(REVISION)
  return cache, snapshot


def test_names_resolve_from_the_cache_offline(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  cache, snapshot = _cache_with(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  got = hub.local_path("stabilityai/stable-diffusion-xl-base-1.0", "--sdxl")
  assert os.path.samefile(got, snapshot) and os.path.isfile(os.path.join(got, "unet",
                                                                         "config.json"))
  assert hub.local_path(str(tmp_path)) == str(tmp_path)  # local directories pass through
  with pytest.raises(UserError, match=f"'org/missing' is neither a local directory nor in the "
                                      f"Hugging Face cache {cache}.*huggingface-cli download"):
    hub.local_path("org/missing", "--sdxl")
  with pytest.raises(FileNotFoundError, match="'/no/such/dir' is not a directory"):
    hub.local_path("/no/such/dir", "--sdxl")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # takes precedence
  with pytest.raises(UserError, match="elsewhere"):
    hub.local_path("stabilityai/stable-diffusion-xl-base-1.0")


@pytest.mark.slow  # loads the tiny SDXL UNet
def test_a_cached_name_loads_the_model(tiny_sdxl_dir, tmp_path, monkeypatch):
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  _, snapshot = _cache_with(tmp_path, "org/tiny-sdxl", tiny_sdxl_dir)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  model, params = sdxl.load_unet(hub.local_path("org/tiny-sdxl", "config.student_unet"))
  _, want = sdxl.load_unet(str(snapshot))
  assert model.config["cross_attention_dim"] == sdxl.TINY_UNET_CONFIG["cross_attention_dim"]
  assert params.keys() == want.keys()
