#!/usr/bin/env bash
# Reproduce the shipped SPI models (dials_diffnet/weights/spi_multi, spi_twin), their evaluation
# and the twin-network sweep, on CPU. Data (simulated + represented) are cached in $CACHE.
#   bash scripts/train_spi.sh            # one thread unless OMP_NUM_THREADS says otherwise
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTBX_BUILD=/usr/lib/cctbx/python3.11
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 only on an unloaded machine: busy OpenMP threads crawl when cores are shared
PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-/tmp/diffnet_spi_data}
OUT=${OUT:-/tmp/diffnet_spi}
WEIGHTS=dials_diffnet/weights
mkdir -p "$OUT"
# both models from scratch (spi_multi 0.5.0, spi_twin 0.4.0)
$PY -m dials_diffnet.spi.train --cache "$CACHE" --out "$WEIGHTS"
# warm_restart TAG ARGS...: keep the current spi_multi as $OUT/spi_multi_TAG.*, then train it on with a fresh schedule
warm_restart() {
  local tag=$1
  shift
  cp "$WEIGHTS/spi_multi.safetensors" "$OUT/spi_multi_$tag.safetensors"
  cp "$WEIGHTS/spi_multi.json" "$OUT/spi_multi_$tag.json"
  $PY -m dials_diffnet.spi.train --cache "$CACHE" --out "$WEIGHTS" --only multi \
      --init "$OUT/spi_multi_$tag.safetensors" "$@" --warmup 0.05
}
# spi_multi 0.6.0: a warm restart of 0.5.0 (its weights, a fresh schedule at a third of the LR)
warm_restart 050 --epochs 36 --lr 1e-3
# spi_multi 0.7.0: 0.6.0 trained on twice the shots (150 per class; the first 75 are the old set)
warm_restart 060 --train-per-class 150 --epochs 12 --lr 1e-3
# spi_multi 0.8.0: 0.7.0 trained on twice the shots again (300 per class; the first 150 are the old set)
warm_restart 070 --train-per-class 300 --epochs 8 --lr 1e-3
# spi_multi 0.9.0: 0.8.0 trained on half as many shots again (450 per class), at half the peak LR
warm_restart 080 --train-per-class 450 --epochs 8 --lr 5e-4
# spi_multi 0.10.0: 0.9.0 trained on 550 shots per class (35 200; the first 450 per class are the old set)
warm_restart 090 --train-per-class 550 --epochs 8 --lr 5e-4
# spi_multi 0.11.0: 0.10.0 trained on 600 shots per class (38 400; the first 550 per class are the old set)
warm_restart 0100 --train-per-class 600 --epochs 8 --lr 5e-4
# spi_multi 0.12.1: 0.11.0 trained on those and 4 800 more 3- and 4-particle shots (the counts it gets wrong);
# train_multi folds the unequal counts (9 600 / 9 600 / 12 000 / 12 000) out of the count logits at the end
warm_restart 0110 --train-per-class 600 --crowded-per-class 150 --epochs 8 --lr 5e-4
# spi_multi 0.13.0: 0.12.1 trained on 4 800 shots whose particles overlap in projection (the close set) and a
# replay of the first 150 per class of the training set and the crowded set
warm_restart 0121 --train-per-class 150 --crowded-per-class 150 --close-per-class 100 --epochs 8 --lr 5e-4
# spi_multi 0.14.0: 0.13.0 with a hit head (a particle in the beam against a blank frame) trained on its frozen
# trunk's features of 6 400 recipe shots no spi_multi trained on and 3 200 noisy blanks; count and type unchanged
cp "$WEIGHTS/spi_multi.safetensors" "$OUT/spi_multi_0130.safetensors"
cp "$WEIGHTS/spi_multi.json" "$OUT/spi_multi_0130.json"
$PY -m dials_diffnet.spi.train --cache "$CACHE" --out "$WEIGHTS" --only hit --init "$OUT/spi_multi_0130.safetensors"
$PY -m dials_diffnet.spi.evaluate --cache "$CACHE" --weights "$WEIGHTS" --sweep --update-cards \
    --json "$OUT/spi_evaluation.json" | tee "$OUT/spi_evaluation.txt"
