#!/usr/bin/env bash
# Reproduces the shipped crystallography model, end to end, on CPU (or CUDA when present):
# training shards (seeds 1-4, 7-9, 11-15, 17, 19; seeds 16 and 18 for the stage-10 and stage-11 choices), held-out test sets (seeds 101 and 102; 102 is a detector never seen in
# training, Eiger 4M (seed 4 trains on an Eiger 16M), at 0.6-2.0 A, wider than stages 1-9 trained on; stage 10 covers it), training, evaluation, and the
# model cards of both shipped crystal models: crystal (stage 11) and crystal_fast (stage 6, no signal-to-noise plane).
#   bash scripts/train_crystal.sh            # or: make train-crystal
# Environment: OUT (work directory), N_TRAIN (training images per seed, default 8192), EPOCHS (default 10),
# RESUME_EPOCHS (default "16 24 32", as the shipped model; empty: no resumed run),
# FINAL_EPOCHS (default 8: stage 2, with the radius plane, on seeds 1 and 2; 0: skip it),
# STAGE3_EPOCHS (default 4: stage 3, on seeds 1, 2 and 3; 0: skip it),
# STAGE4_EPOCHS (default 4: stage 4, on seed 4, whose stills add the Eiger 16M; 0: skip it),
# STAGE5_EPOCHS (default 4: stage 5, on seed 7 with the hit term weighted 4; 0: skip it),
# STAGE6_EPOCHS (default 4: stage 6, on seeds 8 and 9, hit term weighted 4; 0: skip it),
# STAGE7_EPOCHS (default 6: stage 7, the signal-to-noise plane added, on seed 11; 0: skip it),
# STAGE8_EPOCHS (default 6: stage 8, on seeds 11 and 12; 0: skip it),
# STAGE9_EPOCHS (default 6: stage 9, on seeds 11, 12 and 13; 0: skip it),
# STAGE10_EPOCHS (default 5: stage 10, on seeds 14 and 15; 0: skip it),
# STAGE11_EPOCHS (default 5: stage 11, on seeds 17 and 19, the shipped crystal; 0: skip it).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export LIBTBX_BUILD=/usr/lib/cctbx/python3.11
export PATH="$repo/.venv/bin:$PATH"
out=${OUT:-$repo/training_run}
mkdir -p "$out"
cd "$out"

for seed in 1 2 3; do
  diffnet.simulate format=shards n_images=${N_TRAIN:-8192} seed=$seed nproc=2 shard_size=128 \
    recipe.images_per_geometry=32 output.directory=train_s$seed output.log=simulate_train$seed.log
done
# The training detectors from seed 4 on: the five above and the photon-counting 75 um Eiger 16M (the held-out
# Eiger 4M differs in size, distance range and wavelength range). six_detectors SEED N_IMAGES [PHIL...]
six_detectors() {
  local seed=$1 n=$2
  shift 2
  diffnet.simulate format=shards n_images=$n seed=$seed nproc=2 shard_size=128 "$@" \
    recipe.images_per_geometry=32 "recipe.detectors=pilatus6m pilatus2m rayonix340 cspad jungfrau4m eiger16m" \
    output.directory=train_s$seed output.log=simulate_train$seed.log
}
six_detectors 4 "${N_TRAIN:-8192}"
# Seed 7: the same six detectors; the first seed simulated with hot pixels masked (session 12; seeds
# 1-4 of the shipped model were simulated before, so a re-run trains on slightly cleaner images).
# Seeds 8 and 9 (session 13): two more such sets for stage 6.
for seed in 7 8 9; do six_detectors $seed "${N_TRAIN:-8192}"; done
# Seeds 11 and 12 (session 16) and 13 (session 19): the same recipe, stored with the third, signal-to-noise plane (planes=3).
for seed in 11 12 13; do six_detectors $seed "${N_TRAIN:-8192}" planes=3; done
# Seeds 14 and 15 (session 26): fresh stills for stage 10; seed 15 spans the 0.6-2.0 A beamlines use (2,048 stills).
# Seed 16 (1,024 stills, the seed-11 recipe) is where stage 10 was chosen against stage 9; no stage trains on it.
six_detectors 14 8192 planes=3
six_detectors 16 1024 planes=3
six_detectors 15 2048 planes=3 recipe.wavelength=0.6,2.0
# Seeds 17 and 19 (session 27): fresh stills for stage 11, all at 0.6-2.0 A. Seed 18 (1,024 stills, the same recipe)
# is, with seed 16, where stage 11 was chosen against stage 10; no stage trains on it.
six_detectors 17 8192 planes=3 recipe.wavelength=0.6,2.0
six_detectors 19 8192 planes=3 recipe.wavelength=0.6,2.0
six_detectors 18 1024 planes=3 recipe.wavelength=0.6,2.0
# Test sets with all three planes: 2-plane models read the first two.
diffnet.simulate format=shards n_images=1024 seed=101 nproc=2 shard_size=128 planes=3 recipe.images_per_geometry=16 \
  output.directory=test_s101 output.log=simulate_test101.log
diffnet.simulate format=shards n_images=512 seed=102 nproc=2 shard_size=128 planes=3 recipe.images_per_geometry=16 \
  recipe.detectors=eiger4m recipe.wavelength=0.6,2.0 output.directory=test_s102_eiger4m output.log=simulate_test102.log

# Stage 1 (shipped as 0.3.0): no radius plane, seed-1 images only.
stage1="train_s1 model.depth=18 model.width=16 model.radius_channel=False batch_size=32 lr=2e-3 seed=0 threads=2"
diffnet.train $stage1 epochs=${EPOCHS:-10} checkpoint.directory=checkpoints output.weights=crystal.safetensors
# Resumed runs, one per number in RESUME_EPOCHS (the cosine schedule re-spread over each new total,
# i.e. a warm restart): the shipped model was trained 10 epochs, then resumed to 16, 24 and 32.
for resume_epochs in ${RESUME_EPOCHS-16 24 32}; do
  diffnet.train $stage1 epochs=$resume_epochs checkpoint.directory=checkpoints checkpoint.resume=True \
    output.weights=crystal.safetensors
done
# Stages 2-4 each keep the previous stage's model as crystal_stage<N-1>.* and train it further with
# the |q| plane and a fresh schedule (next_stage N EPOCHS LR DATA...; EPOCHS 0 skips the stage).
next_stage() {
  local stage=$1 epochs=$2 lr=$3 previous=crystal_stage$(($1 - 1))
  shift 3
  [ "$epochs" -gt 0 ] || return 0
  mv crystal.safetensors $previous.safetensors && mv crystal.json $previous.json
  diffnet.train "$@" model.depth=18 model.width=16 model.radius_channel=True \
    model.init=$previous.safetensors epochs=$epochs batch_size=32 lr=$lr seed=0 threads=2 \
    checkpoint.directory=checkpoints_stage$stage output.weights=crystal.safetensors
}
# Stage 2 (0.4.0): the stage-1 model given the |q| plane (zero weight at the start, so it begins
# from stage 1's predictions), trained on twice the images (seeds 1 and 2).
next_stage 2 "${FINAL_EPOCHS:-8}" 1e-3 train_s1 train_s2
# Stage 3 (0.5.0): 4 more epochs on seeds 1, 2 and 3.
next_stage 3 "${STAGE3_EPOCHS:-4}" 5e-4 train_s1 train_s2 train_s3
# Stage 4 (0.6.0): 4 more epochs on seed 4 alone.
next_stage 4 "${STAGE4_EPOCHS:-4}" 5e-4 train_s4
# Stage 5 (0.7.0): 4 more epochs on seed 7, the hit term weighted 4 against resolution.
next_stage 5 "${STAGE5_EPOCHS:-4}" 5e-4 train_s7 loss.hit_weight=4
# Stage 6 (0.8.0, shipped as crystal_fast): 4 more epochs on seeds 8 and 9 together, the same loss.
next_stage 6 "${STAGE6_EPOCHS:-4}" 5e-4 train_s8 train_s9 loss.hit_weight=4
cp crystal.safetensors crystal_fast.safetensors && cp crystal.json crystal_fast.json
# Stage 7 (0.9.0): the stage-6 model given the signal-to-noise plane (zero weight at the start), 6 epochs on seed 11.
next_stage 7 "${STAGE7_EPOCHS:-6}" 5e-4 train_s11 model.planes=3 loss.hit_weight=4
# Stage 8 (0.10.0): 6 more epochs on seeds 11 and 12 together.
next_stage 8 "${STAGE8_EPOCHS:-6}" 5e-4 train_s11 train_s12 model.planes=3 loss.hit_weight=4
# Stage 9 (0.11.0): 6 more epochs on seeds 11, 12 and 13 together.
next_stage 9 "${STAGE9_EPOCHS:-6}" 5e-4 train_s11 train_s12 train_s13 model.planes=3 loss.hit_weight=4
# Stage 10 (0.12.0): 5 more epochs at lr 3e-4 on the fresh seeds 14 and 15, 5 % of them held out for the epoch log.
next_stage 10 "${STAGE10_EPOCHS:-5}" 3e-4 train_s14 train_s15 model.planes=3 loss.hit_weight=4 data.val_fraction=0.05
# Stage 11 (0.13.0): 5 more epochs at lr 3e-4 on the fresh seeds 17 and 19 (0.6-2.0 A), 5 % held out for the epoch log.
next_stage 11 "${STAGE11_EPOCHS:-5}" 3e-4 train_s17 train_s19 model.planes=3 loss.hit_weight=4 data.val_fraction=0.05

# Held-out figures for one view (the network alone), 2 (diffnet.predict's default on CPU) and 8.
for model in crystal crystal_fast; do
  for test in test_s101 test_s102_eiger4m; do
    for views in 1 2 8; do
      diffnet.evaluate $test model.crystal=$model.safetensors views=$views output.json=evaluate_${model}_${test}_views$views.json \
        output.log=evaluate_${model}_${test}_views$views.log
      python - "$model" "$test" "$views" <<'PY'
import json, sys
from dials_diffnet.weights import attach_evaluation
model, test, views = sys.argv[1:]
metrics = json.load(open(f"evaluate_{model}_{test}_views{views}.json"))
command = f"diffnet.evaluate {test} model.crystal={model}.safetensors views={views}  (data: scripts/train_crystal.sh)"
attach_evaluation(f"{model}.safetensors", f"{test} views={views}", command, metrics)
PY
    done
  done
  cp $model.safetensors $model.json "$repo/dials_diffnet/weights/"
done
echo "Installed $out/crystal.* and $out/crystal_fast.* into dials_diffnet/weights/"
