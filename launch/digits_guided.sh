#!/usr/bin/env bash
# The guided rows of the digits table in docs/pixel.md: a tiny UViT base model trained with label
# dropout (p_uncond 0.1, the same settings as launch/digits_table.sh otherwise), sampled with
# aDDIM unguided and with classifier-free guidance, then a 4-step CD student of its guided teacher.
# Needs `pip install -e '.[demo]'`. Re-running resumes / reuses finished runs.
# bash launch/digits_guided.sh [RUNS_DIR] [GUIDANCE_SCALE]
set -euo pipefail
RUNS=${1:-runs/digits}
W=${2:-2}
source "$(dirname "$0")/digits_flags.sh"
BASE=("${BASE_FLAGS[@]}" --workdir="$RUNS/base_p0.1" --config.p_uncond=0.1)
python -m mcm_jax.main "${BASE[@]}"
python -m mcm_jax.main "${BASE[@]}" --mode=eval "--config.eval.steps=(1,4,64)"
cp "$(ls "$RUNS"/base_p0.1/eval_step*.json | tail -1)" "$RUNS/base_p0.1/eval_w1.json"
python -m mcm_jax.main "${BASE[@]}" --mode=eval "--config.eval.steps=(1,4,64)" \
    --config.sample.guidance_scale="$W"
CD=("${CD_FLAGS[@]}" --workdir="$RUNS/cd4_w$W" --config.init_from="$RUNS/base_p0.1"
    --config.consistency.student_steps=4 --config.consistency.guidance_scale="$W")
python -m mcm_jax.main "${CD[@]}"
python -m mcm_jax.main "${CD[@]}" --mode=eval
python - "$RUNS" "$W" <<'PY'
import glob, json, os, sys
runs, w = sys.argv[1], sys.argv[2]
print("| model | guidance w | sampler steps | FD-digits | class accuracy |")
print("|---|---|---|---|---|")
base = os.path.join(runs, "base_p0.1")
rows = [("base p_uncond 0.1 (aDDIM)", os.path.join(base, "eval_w1.json")),
        ("base p_uncond 0.1 (aDDIM)", sorted(glob.glob(os.path.join(base, "eval_step*.json")))[-1]),
        (f"CD student of the w = {w} teacher", sorted(glob.glob(os.path.join(runs, f"cd4_w{w}", "eval_step*.json")))[-1])]
for label, path in rows:
  for r in json.load(open(path))["results"]:
    g = r["guidance_scale"] if label.startswith("base") else f"{w} (teacher)"
    print(f"| {label} | {g} | {r['steps']} | {r['fd']:.2f} | {r['class_accuracy']:.3f} |")
PY
