#!/usr/bin/env bash
# TPU pod slice: the same command on every worker (one process per host).
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/imagenet64_cd.py:small \
#       /mnt/shared/runs/in64_cd --config.init_from=/mnt/shared/runs/in64_base
# Assumes this repository is checked out at ~/mcm_jax on every worker and installed with
# `pip install -e '.[imagenet]' 'jax[tpu]'`. jax.distributed.initialize() (--multihost) finds the
# other hosts by itself on TPU VMs. Preemption sends SIGTERM: a checkpoint is saved first.
set -euo pipefail
TPU=${1:?tpu name}
ZONE=${2:?zone}
CONFIG=${3:?config}
# WORKDIR: a filesystem path every host mounts (NFS / Filestore). gs:// workdirs are not
# supported yet (metrics and PNG writers use local file I/O).
WORKDIR=${4:?workdir on a filesystem every host mounts}
shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd ~/mcm_jax && python -m mcm_jax.main --multihost --config=$CONFIG --workdir=$WORKDIR $*"
