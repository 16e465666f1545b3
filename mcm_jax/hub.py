"""Model names as users write them (``stabilityai/stable-diffusion-xl-base-1.0``), resolved from
the local Hugging Face cache with no network access; local directories pass through.

The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (read
when called, in the hub's own layout: ``models--<org>--<name>/snapshots/<revision>/...``).
Nothing is ever downloaded here: a name missing from the cache is an error saying where it was
looked for and how to fill the cache.
"""
import os
import re

from mcm_jax.errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as on the hub


def cache_dir():
  """The Hugging Face hub cache directory this process would use."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                   "huggingface")
  return os.path.join(home, "hub")


def local_path(name_or_path, what="path"):
  """``name_or_path`` if it is a local directory, else the cached snapshot of the hub model it
  names (``what`` names the flag or config field in errors)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if not _NAME.match(name_or_path or ""):
    raise FileNotFoundError(f"{what}={name_or_path!r} is not a directory; allowed: a local "
                            "diffusers-layout directory or a Hugging Face model name (org/name) "
                            "in the local cache")
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  try:
    return snapshot_download(name_or_path, cache_dir=cache_dir(), local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f"{what}={name_or_path!r} is neither a local directory nor in the Hugging Face cache "
        f"{cache_dir()} (searched offline; nothing is downloaded here). Fill the cache on a "
        f"machine with internet access (`huggingface-cli download {name_or_path}`, with HF_HOME "
        "set to where it should go) and copy it here, or pass a local directory") from e
