#!/usr/bin/env bash
# The CPU digits demo behind the table in docs/pixel.md: a tiny UViT base model on scikit-learn's digits
# (16x16), then one CD student per step count (1, 2, 4, 8) from it, each evaluated with
# --mode=eval (FD in a digits classifier's features, class accuracy of the samples).
# Needs `pip install -e '.[demo]'`. Re-running resumes / reuses finished runs.
# bash launch/digits_table.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/digits}
source "$(dirname "$0")/digits_flags.sh"
BASE=("${BASE_FLAGS[@]}" --workdir="$RUNS/base")
python -m mcm_jax.main "${BASE[@]}"
python -m mcm_jax.main "${BASE[@]}" --mode=eval "--config.eval.steps=(1,2,4,8,64)"
for STEPS in 1 2 4 8; do
  CD=("${CD_FLAGS[@]}" --workdir="$RUNS/cd$STEPS" --config.init_from="$RUNS/base"
      --config.consistency.student_steps="$STEPS")
  python -m mcm_jax.main "${CD[@]}"
  python -m mcm_jax.main "${CD[@]}" --mode=eval
done
python - "$RUNS" <<'PY'
import glob, json, os, sys
runs = sys.argv[1]
print("| model | sampler steps | FD-digits | class accuracy |")
print("|---|---|---|---|")
for name in ["base", "cd1", "cd2", "cd4", "cd8"]:
  path = sorted(glob.glob(os.path.join(runs, name, "eval_step*.json")))[-1]
  for r in json.load(open(path))["results"]:
    label = "base (aDDIM)" if name == "base" else f"CD student ({r['steps']}-step)"
    print(f"| {label} | {r['steps']} | {r['fd']:.2f} | {r['class_accuracy']:.3f} |")
PY
