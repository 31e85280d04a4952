#!/usr/bin/env bash
# The main job on built-in defaults: a simulated serial-crystallography run (one protein, random
# orientations, some blanks and multi-lattice shots) written as CBF, imported with DIALS, judged by
# the shipped models, filtered, and the kept shots spot-found and indexed. Then an XFEL single-particle
# run (1-4 particles per shot, as CXI) counted by the shipped SPI models.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export LIBTBX_BUILD=/usr/lib/cctbx/python3.11
export PATH="$repo/.venv/bin:$PATH"
work=${DEMO_DIR:-$repo/demo_run}
cell=78,78,38,90,90,90
rm -rf "$work" && mkdir -p "$work" && cd "$work"

diffnet.simulate n_images=${DEMO_IMAGES:-24} seed=7 recipe.detectors=pilatus6m \
  recipe.unit_cell=$cell recipe.crystal_system=tetragonal output.directory=images
dials.import images/shot_*.cbf
diffnet.predict imported.expt
diffnet.filter imported.expt diffnet.json
dials.find_spots filtered.expt nproc=2
# each kept still indexed on its own against the known cell, as serial data are (dials.ssx_index does the same)
dials.index filtered.expt strong.refl stills.indexer=sequences indexing.joint_indexing=False \
  indexing.method=real_space_grid_search unit_cell=$cell space_group=P4 \
  refinement.parameterisation.detector.fix=all refinement.parameterisation.beam.fix=all
diffnet.evaluate predictions=diffnet.json dials_baseline=True

# SPI: noisy pnCCD shots of capsids, 1-4 per shot, and blank frames (detector noise only), on detector
# geometries the models never saw
mkdir -p spi && cd spi
python - <<'EOF'
from dials_diffnet.spi import simulate as sim
from dials_diffnet.spi.cxi import write_cxi

shots = [sim.simulate(sim.shot_params(4_200_000 + i, "capsid", 0 if i % 5 == 4 else 1 + i % 4, "noisy", "test"))
         for i in range(10)]
write_cxi("run.cxi", shots)
print("wrote run.cxi: capsids per shot (0: a blank)", [s.params.count for s in shots])
EOF
diffnet.predict task=spi run.cxi
cat diffnet.txt
cd ..
echo "Demo outputs are in $work (the SPI run in $work/spi)"
