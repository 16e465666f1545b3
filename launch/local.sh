#!/usr/bin/env bash
# Single host: bash launch/local.sh [CONFIG] [WORKDIR] [extra flags, e.g. --config.student.steps=100]
# Re-running the same command resumes from the checkpoints in WORKDIR.
set -euo pipefail
CONFIG=${1:-configs/toy.py}
WORKDIR=${2:-runs/$(basename "${CONFIG%%.py*}")}
shift $(( $# > 2 ? 2 : $# ))
exec python -m mcm_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
