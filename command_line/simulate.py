"""diffnet.simulate: physically labelled diffraction stills, as CBF images or training shards."""

from __future__ import annotations

import logging
import multiprocessing
import sys

from dials.util import Sorry, log, show_mail_handle_errors
from dials.util.options import ArgumentParser

from dials_diffnet.simulate.dataset import IMAGE_FORMATS, check_resumable, generate_shards, write_images
from dials_diffnet.simulate.detectors import DETECTORS, pilatus_model
from dials_diffnet.simulate.stills import Recipe
from dials_diffnet.util import load_phil, parse_command_line

logger = logging.getLogger("dials.diffnet.simulate")
phil_scope = load_phil("simulate")

help_message = """
Simulate X-ray diffraction stills (single and multi-lattice crystals, blanks,
weak hits) on real detector models, with labels: resolution, number of
lattices, hit. format=cbf (or minicbf for Pilatus) writes shot_NNNNN.cbf + shot_NNNNN.json for
dials.import; format=nexus writes NXmx files (one per geometry group, shots_GGGGG.nxs + .json
labels) as an Eiger at an SSX beamline does; format=shards writes training tensors.

Examples::

  diffnet.simulate n_images=50 output.directory=sim
  dials.import sim/shot_*.cbf
  diffnet.simulate format=nexus recipe.detectors=eiger4m n_images=64 recipe.images_per_geometry=32
  dials.import simulated/shots_*.nxs
  diffnet.simulate format=shards n_images=10000 seed=1 nproc=2 output.directory=train
"""


def recipe_from(params) -> Recipe:
    unknown = set(params.recipe.detectors) - set(DETECTORS)
    if unknown:
        raise Sorry(f"Unknown detector(s) {sorted(unknown)}; choose from {sorted(DETECTORS)}")
    if sum(params.recipe.lattice_counts) <= 0:
        raise Sorry("recipe.lattice_counts must not all be zero")
    total = sum(params.recipe.lattice_counts)
    return Recipe(
        detectors={d: 1.0 for d in params.recipe.detectors},
        wavelength=tuple(params.recipe.wavelength),
        distance_scale=tuple(params.recipe.distance_scale),
        p_blank=params.recipe.p_blank,
        lattice_counts=tuple(v / total for v in params.recipe.lattice_counts),
        images_per_geometry=params.recipe.images_per_geometry,
        unit_cell=tuple(params.recipe.unit_cell) if params.recipe.unit_cell else None,
        crystal_system=params.recipe.crystal_system,
    )


def check_image_format(params):
    """Sorry for a detector or option the chosen image format cannot hold."""
    if params.format == "minicbf":
        not_pilatus = [d for d in params.recipe.detectors if pilatus_model(d) is None]
        if not_pilatus:
            raise Sorry(f"format=minicbf is for Pilatus detectors only; not {not_pilatus}")
    if params.format == "nexus":
        multi_panel = [d for d in params.recipe.detectors if d in DETECTORS and len(DETECTORS[d].panels) > 1]
        if multi_panel:
            raise Sorry(f"format=nexus is written for single-panel detectors only; not {multi_panel}")
    always = {"minicbf": "byte-offset compressed, as a Pilatus writes it", "nexus": "bitshuffle-LZ4 compressed, as an Eiger writes it"}
    if params.format in always and not params.compress:
        raise Sorry(f"format={params.format} is always {always[params.format]} (compress=False is for format=cbf)")


def _shard_worker(args):
    out_dir, seed, n_images, recipe, shard_size, worker, n_workers, planes = args
    generate_shards(out_dir, seed, n_images, recipe, shard_size, worker, n_workers, log=logger.info, planes=planes)


@show_mail_handle_errors()
def run(args=None, phil=phil_scope):
    parser = ArgumentParser(usage="diffnet.simulate [options]", phil=phil, epilog=help_message, check_format=False)
    params, _ = parse_command_line(parser, args, return_unhandled=False)
    log.config(logfile=params.output.log)
    diff = parser.diff_phil.as_str()
    if diff:
        logger.info("The following parameters have been modified:\n%s", diff)
    recipe = recipe_from(params)
    out = params.output.directory
    if params.format in IMAGE_FORMATS:
        check_image_format(params)
        paths = write_images(out, params.seed, params.n_images, recipe, compress=params.compress, image_format=params.format)
        files = "shots_GGGGG.nxs" if params.format == "nexus" else "shot_NNNNN.cbf"
        logger.info("Wrote %d images to %s in %d files (%s + .json labels)", params.n_images, out, len(paths), files)
        return
    jobs = [(out, params.seed, params.n_images, recipe, params.shard_size, w, params.nproc, params.planes)
            for w in range(params.nproc)]
    try:
        check_resumable(out, params.planes)
    except ValueError as e:
        raise Sorry(str(e)) from None
    if params.nproc == 1:
        _shard_worker(jobs[0])
    else:
        with multiprocessing.get_context("spawn").Pool(params.nproc) as pool:
            pool.map(_shard_worker, jobs)
    logger.info("Wrote %d images as shards to %s", params.n_images, out)


if __name__ == "__main__":
    run(sys.argv[1:])
