"""TPU topologies by name for ``--mode=plan``: Cloud TPU names -> libtpu topologies, HBM per
chip, and the abstract devices libtpu describes (no TPU needed), or the devices present."""
import importlib.util
import os
import re

import jax

from mcm_jax.errors import UserError

GIB = 2 ** 30
# HBM per chip in GiB: Google Cloud TPU documentation, system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Cloud TPU names -> libtpu topologies (chips along each axis). v5e / v6e names count chips; v4 /
# v5p names count TensorCores, two per chip, which JAX drives as one ('megacore') device per
# chip: v4-8 and v5p-8 are 4 chips.
TOPOLOGIES = {"v4-8": "v4:2x2x1", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8",
              "v5e-256": "v5e:16x16", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4",
              "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16"}


def topology_devices(name):
  """(devices, libtpu topology or 'local', HBM GiB per chip or None) of ``--topology=NAME``: a
  Cloud TPU name of ``TOPOLOGIES``, a libtpu spelling like 'v5e:8x8', or 'local' (the devices
  present; HBM from the backend's memory stats, None on CPU)."""
  if name == "local":
    devices = jax.devices()
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    return devices, "local", limit / GIB if limit else None
  spec = TOPOLOGIES.get(name, name)
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):\d+(x\d+){1,2}", spec)
  if m is None:
    raise UserError(f"--topology={name!r} is not known; allowed: {', '.join(TOPOLOGIES)}, a "
                    "libtpu spelling such as v5e:8x8 or v5p:2x2x1, or local")
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"--topology={name} compiles for TPU with libtpu, which is not installed: "
                    "pip install -e '.[tpu]' (or plan for the devices present: --topology=local)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  generation = m.group(1)
  # Only compiling: no TPU is claimed, so libtpu need not lock out other processes using it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:  # the host grouping (chips_per_host_bounds) does not change a one-slice compile
    devices = topologies.get_topology_desc(
        platform="tpu", topology_name=spec,
        chip_config_name="megacore" if generation in ("v4", "v5p") else "default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False)).devices
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--topology={name}: libtpu cannot make the topology {spec!r} ({e})") from e
  return devices, spec, HBM_GIB[generation]
