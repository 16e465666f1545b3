#!/usr/bin/env bash
# The toy table with training seeds' spread (docs/toy.md): every (method, student steps) student of
# the default toy config trained with 3 seeds (student.seed + 0, 1, 2; one teacher per dataset),
# on each built-in 2-D dataset. The tables show mean ± half the range over the seeds.
# Re-running resumes / reuses finished runs. About 25 minutes per dataset on 2 CPU cores.
#   bash launch/toy_seeds.sh [RUNS_DIR] [extra --config flags]
#   DATASETS="moons swissroll" bash launch/toy_seeds.sh runs/toy_seeds \
#       "--config.sweep.student_steps=(1,2,4,8)"
set -euo pipefail
RUNS=${1:-runs/toy_seeds}
shift || true
for DATA in ${DATASETS:-ring8 checkerboard moons swissroll}; do
  python -m mcm_jax.main --config=configs/toy.py --workdir="$RUNS/$DATA" \
    --config.data.name="$DATA" --config.sweep.num_seeds=3 --config.fig1.enabled=False "$@"
  cat "$RUNS/$DATA/results.md"
done
