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
mkdir -p "$OUT"
$PY -m dials_diffnet.spi.train --cache "$CACHE" --out dials_diffnet/weights
$PY -m dials_diffnet.spi.evaluate --cache "$CACHE" --weights dials_diffnet/weights --sweep --update-cards \
    --json "$OUT/spi_evaluation.json" | tee "$OUT/spi_evaluation.txt"
