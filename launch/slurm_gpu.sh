#!/usr/bin/env bash
# Multi-node GPU under SLURM: one process per node, all of the node's GPUs per process.
#   sbatch --nodes=4 launch/slurm_gpu.sh configs/imagenet64_cd.py:small /shared/runs/in64_cd \
#       --config.init_from=/shared/runs/in64_base --config.data.data_dir=/shared/tfds
# jax.distributed.initialize() (--multihost) reads the coordinator address, process count and
# id from SLURM's environment. WORKDIR must be on a filesystem every node sees (orbax writes
# one checkpoint from all processes). Re-submitting the same command resumes.
#SBATCH --job-name=mcm_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
set -euo pipefail
CONFIG=${1:?config, e.g. configs/imagenet64_cd.py:small}
WORKDIR=${2:?workdir on a shared filesystem}
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 python -m mcm_jax.main --multihost \
  --config="$CONFIG" --workdir="$WORKDIR" "$@"
