#!/usr/bin/env bash
# The full-size SDXL rehearsal on one machine (CPU is enough; 24 GB of memory), at 256 px:
#
#   bash launch/sdxl_rehearsal.sh [SDXL_DIR] [WORK] [CONTROLNET_DIR]
#   ONLY="crosscheck t2i_eval" bash launch/sdxl_rehearsal.sh ...   # only these phases
#
# SDXL_DIR: a local SDXL base directory (the hub layout, fp16 variant or not). Without it, a
# directory of random weights at the real sizes is made once by benchmarks/make_random_sdxl.py
# into ~/.cache/mcm_jax/sdxl_random (pip install -e '.[rehearsal]': open_clip_torch's wheel
# holds CLIP's BPE vocabulary) and reused. Phases (each timed, with its peak RSS, into WORK/phases.jsonl):
#   mlcm     the SDXL command of docs/mlcm.md: all three progressive stages (K = 8, 4, 2), two steps each,
#            the guided teacher and the image-free latents inside the step; each stage exports
#            its LoRA (PEFT + kohya) and a sample grid;
#   bank     stage 0 from a trajectory bank (built by the guided teacher, then streamed);
#   reward   stage 0 with reward consistency and feedback learning (MLCM 3.4) scored by a
#            full-size ImageReward v1.0 (IMAGEREWARD_DIR in the environment: a real one; default
#            random weights made once by benchmarks/make_random_imagereward.py into
#            ~/.cache/mcm_jax/imagereward_random), the VAE decoder inside the step;
#   generate 2 / 4 / 8-step images with the last stage's LoRA (one load, generate --steps=2,4,8);
#   tcd      4 steps with TCD's sampler (gamma 0.3) and the same LoRA;
#   stacked_loras  the last stage's LoRA with stage 1's at scale 0.6 (lora.combine), 4 steps;
#   teacher  the base model guided (w = 8, a negative prompt), 25 Euler steps on the 'leading' grid;
#   img2img  the 4-step LoRA from the 4-step image, strength 0.5;
#   lcf      latent consistency fine-tuning (configs/sdxl_lcf.py) of stage 1's LoRA on four
#            captioned images: their VAE latents cached once, two steps with no teacher;
#   pipeline_crosscheck  the guided teacher and img2img against diffusers' PyTorch SDXL pipelines
#            (benchmarks/sdxl_pipeline_crosscheck.py, 4 steps);
#   crosscheck  JAX vs diffusers / PyTorch on the same directory (benchmarks/sdxl_crosscheck.py):
#            UNet eps in float32, in bfloat16 and with float16 weights and float32 compute (the
#            CPU training setting below), the LoRA's effect, one forward's time;
#   unet_export  the UNet as LCM's guidance-conditioned full-UNet student exported in diffusers'
#            layout (fp16) and read back by diffusers: every weight consumed, eps at w = 8
#            against PyTorch (benchmarks/sdxl_unet_export.py). Training a full-UNet student
#            (float32 weights and Adam moments, ~41 GB at SDXL's size) does not fit this machine:
#            its plan is `--config=configs/sdxl_lcm.py --mode=plan`.
#   controlnet  an SDXL ControlNet (CONTROLNET_DIR, default one made once from SDXL_DIR's UNet
#            with random zero convolutions into ~/.cache/mcm_jax/controlnet_random) read by
#            sdxl.load_controlnet, its residuals against diffusers' PyTorch ControlNetModel
#            (benchmarks/sdxl_controlnet.py);
#   controlnet_generate  the 4-step LoRA with that ControlNet, the 4-step image as control image;
#   components_crosscheck  both text encoders (diffusers' encode_prompt) and the VAE (decode,
#            encode) against PyTorch (benchmarks/sdxl_components_crosscheck.py);
#   mlcd_step  one MLCD training step at full size, JAX against diffusers + peft
#            (benchmarks/mlcm.py --sdxl);
#   t2i_eval  the last stage's LoRA at 1 / 2 / 4 steps and the same LoRA with LCM's sampler,
#            scored by a full-size CLIP ViT-L/14 (random, made once by
#            benchmarks/make_random_clip.py into ~/.cache/mcm_jax/clip_l_random; CLIP_DIR in the
#            environment: a real one).
# Re-running resumes: finished stages and phases' outputs are reused by the training runs. ONLY
# (phase names, space- or comma-separated) runs those phases alone; later phases read earlier
# ones' outputs (the LoRAs of mlcm, the 4-step image of generate) from WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-}
WORK=${2:-runs/sdxl_rehearsal}
CONTROLNET=${3:-$HOME/.cache/mcm_jax/controlnet_random}
if [ -z "$DIR" ]; then
  DIR=$HOME/.cache/mcm_jax/sdxl_random
  if [ ! -f "$DIR/unet/diffusion_pytorch_model.fp16.safetensors" ]; then
    python benchmarks/make_random_sdxl.py "$DIR"
  fi
fi
mkdir -p "$WORK"
PHASES=$WORK/phases.jsonl
printf '%s\n' "a red fox in the snow" "a lighthouse at dusk, oil painting" \
  "a bowl of ramen, studio photo" "an astronaut riding a horse" > "$WORK/prompts.txt"

ONLY=${ONLY:-}
selected() {  # selected NAME: true when ONLY is empty or names NAME
  [ -z "$ONLY" ] || [[ " ${ONLY//,/ } " == *" $1 "* ]]
}
phase() {  # phase NAME COMMAND...: wall time and peak RSS of COMMAND into $PHASES
  local name=$1
  shift
  selected "$name" || return 0
  /usr/bin/time -a -o "$PHASES" -f "{\"phase\": \"$name\", \"wall_s\": %e, \"peak_rss_kib\": %M}" \
    "$@"
}
json_phase() {  # json_phase NAME COMMAND...: phase, COMMAND's output also into WORK/NAME.json
  selected "$1" || return 0
  phase "$@" | tee "$WORK/$1.json"
}

# float32 compute on CPU, the frozen weights held in float16: XLA:CPU has no bfloat16 matmul and
# holds float32 copies of bfloat16 weights in the step's temporaries, so bfloat16 would need more
# memory there, not less; float16 holds SDXL's float16 files exactly at half float32's memory
# (stage 1's step at 256 px, --mode=plan --topology=local: peak 10.6 GiB, against 14.2 GiB with
# float32 weights and 18.8 GiB in bfloat16). TPUs and GPUs run the config's bfloat16.
MLCM=(python -m mcm_jax.main --config=configs/sdxl_mlcm.py:sdxl --config.student_unet="$DIR"
      --config.prompts="$WORK/prompts.txt" --config.latent_resolution=32
      --config.dtype=float32 --config.unet.frozen_dtype=float16
      --config.train.batch_size=1 --config.train.steps=2 --config.train.log_every=1
      --config.train.checkpoint_every=2 --config.sample.num=1)
phase mlcm "${MLCM[@]}" --workdir="$WORK/mlcm"
phase bank "${MLCM[@]}" --config.mlcm.num_stages=1 --config.mlcm.bank.dir="$WORK/bank" \
  --config.mlcm.bank.entries=2 --workdir="$WORK/mlcm_bank"
IMAGEREWARD=${IMAGEREWARD_DIR:-$HOME/.cache/mcm_jax/imagereward_random}
if selected reward && [ ! -f "$IMAGEREWARD/ImageReward.pt" ]; then
  python benchmarks/make_random_imagereward.py "$IMAGEREWARD"
fi
phase reward "${MLCM[@]}" --config.mlcm.num_stages=1 --config.rewards.scorer=imagereward \
  --config.rewards.imagereward_dir="$IMAGEREWARD" --workdir="$WORK/mlcm_reward"
phase generate python -m mcm_jax.generate --sdxl="$DIR" --lora="$WORK/mlcm/stage2/lora" \
  --prompt="a red fox in the snow" --steps=2,4,8 --resolution=256 --batch_size=1 \
  --out="$WORK/generate"
phase tcd python -m mcm_jax.generate --sdxl="$DIR" --lora="$WORK/mlcm/stage2/lora" \
  --prompt="a red fox in the snow" --steps=4 --sampler=tcd --timesteps=lcm --gamma=0.3 \
  --resolution=256 --batch_size=1 --out="$WORK/tcd"
phase stacked_loras python -m mcm_jax.generate --sdxl="$DIR" \
  --lora="$WORK/mlcm/stage2/lora,$WORK/mlcm/stage1/lora" --lora_scale=1,0.6 \
  --prompt="a red fox in the snow" --steps=4 --resolution=256 --batch_size=1 \
  --out="$WORK/stacked_loras"
phase teacher python -m mcm_jax.generate --sdxl="$DIR" --prompt="a red fox in the snow" \
  --steps=25 --timesteps=leading --guidance_scale=8 --negative_prompt="blurry, low quality" \
  --resolution=256 --batch_size=1 --out="$WORK/teacher"
phase img2img python -m mcm_jax.generate --sdxl="$DIR" --lora="$WORK/mlcm/stage2/lora" \
  --prompt="an oil painting of a red fox" --steps=4 --init_image="$WORK/generate/steps_4/grid.png" \
  --strength=0.5 --resolution=256 --batch_size=1 --out="$WORK/img2img"
python benchmarks/write_image_folder.py "$WORK/lcf_images" 4 320 256
phase lcf python -m mcm_jax.main --config=configs/sdxl_lcf.py --config.student_unet="$DIR" \
  --config.lora.init_from="$WORK/mlcm/stage1/lora" --config.images.dir="$WORK/lcf_images" \
  --config.images.cache_dir="$WORK/lcf_latents" --config.latent_resolution=32 \
  --config.dtype=float32 --config.unet.frozen_dtype=float32 --config.train.batch_size=1 \
  --config.train.steps=2 --config.train.log_every=1 --config.train.checkpoint_every=2 \
  --config.sample.num=1 --workdir="$WORK/lcf"
json_phase pipeline_crosscheck python benchmarks/sdxl_pipeline_crosscheck.py "$DIR"
json_phase crosscheck python benchmarks/sdxl_crosscheck.py "$DIR" \
  --precisions=float32,bfloat16,float32:float16
json_phase unet_export python benchmarks/sdxl_unet_export.py "$DIR" "$WORK/unet_export"
json_phase controlnet python benchmarks/sdxl_controlnet.py "$DIR" "$CONTROLNET"
phase controlnet_generate python -m mcm_jax.generate --sdxl="$DIR" \
  --lora="$WORK/mlcm/stage2/lora" --controlnet="$CONTROLNET" \
  --control_image="$WORK/generate/steps_4/00000_a_red_fox_in_the_snow.png" --controlnet_scale=0.5 \
  --prompt="a red fox in the snow" --steps=4 --resolution=256 --batch_size=1 \
  --out="$WORK/controlnet_generate"
json_phase components_crosscheck python benchmarks/sdxl_components_crosscheck.py "$DIR"
json_phase mlcd_step python benchmarks/mlcm.py --sdxl "$DIR" --batch 1 --latent 32 --rank 64 \
  --repeats 1
CLIP_DIR=${CLIP_DIR:-$HOME/.cache/mcm_jax/clip_l_random}
if selected t2i_eval && [ ! -f "$CLIP_DIR/config.json" ]; then
  python benchmarks/make_random_clip.py "$CLIP_DIR"
fi
head -2 "$WORK/prompts.txt" > "$WORK/eval_prompts.txt"
phase t2i_eval python -m mcm_jax.t2i_eval --sdxl="$DIR" --lora="$WORK/mlcm/stage2/lora" \
  --clip="$CLIP_DIR" --prompts="$WORK/eval_prompts.txt" --steps=1,2,4 --resolution=256 \
  --batch_size=1 --model="lcm-sampler lora=$WORK/mlcm/stage2/lora sampler=lcm timesteps=lcm steps=4" \
  --out="$WORK/t2i_eval"
cat "$PHASES"
