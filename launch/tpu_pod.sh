#!/usr/bin/env bash
# TPU pod slice: the same command on every worker (one process per host).
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/imagenet64_cd.py:small \
#       gs://my-bucket/runs/in64_cd --config.init_from=gs://my-bucket/runs/in64_base \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets
# Assumes this repository is checked out at ~/mcm_jax on every worker and installed with
# `pip install -e '.[imagenet,gcs]' 'jax[tpu]'`. jax.distributed.initialize() (--multihost) finds the
# other hosts by itself on TPU VMs. Preemption sends SIGTERM: a checkpoint is saved first.
set -euo pipefail
TPU=${1:?tpu name}
ZONE=${2:?zone}
CONFIG=${3:?config}
# WORKDIR: gs://bucket/path (every file of the run goes there: checkpoints, config, metrics,
# figures, LoRAs, trajectory bank; mcm_jax.storage) or a path every host mounts (NFS).
WORKDIR=${4:?workdir: gs://bucket/path or a filesystem every host mounts}
shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd ~/mcm_jax && python -m mcm_jax.main --multihost --config=$CONFIG --workdir=$WORKDIR $*"
