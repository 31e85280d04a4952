"""diffnet.train: train the crystallography model on simulated shard datasets."""

from __future__ import annotations

import logging
import pathlib
import sys

from dials.util import Sorry, log, show_mail_handle_errors
from dials.util.options import ArgumentParser

from dials_diffnet.util import load_phil, parse_command_line

logger = logging.getLogger("dials.diffnet.train")

working_phil = load_phil("train")

help_message = """
Train the crystallography CrystalNet (resolution, multi-lattice and hit heads)
on datasets written by diffnet.simulate (a directory with index.json and
shard_NNNNN.npz files). Writes crystal.safetensors and its model card
crystal.json, and a checkpoint after every epoch.

Examples::

  diffnet.train sim/train model.depth=18 model.width=16 epochs=20

  diffnet.train data.train=sim/a data.train=sim/b device=cuda batch_size=256

  diffnet.train sim/train resume=True
"""

DEPTHS = (18, 34, 50)


@show_mail_handle_errors()
def run(args=None, phil=working_phil):
    parser = ArgumentParser(usage="diffnet.train [options] dataset_dir ...", phil=phil, epilog=help_message)
    params, options, unhandled = parse_command_line(parser, args)
    for arg in unhandled:
        if not (pathlib.Path(arg) / "index.json").is_file():
            raise Sorry(f"Unrecognised argument {arg!r} (not a parameter, nor a dataset directory with index.json)")
        params.data.train.append(arg)
    log.config(verbosity=options.verbose, logfile=params.output.log)
    if parser.diff_phil.as_str():
        logger.info("The following parameters have been modified:\n%s", parser.diff_phil.as_str())

    if not params.data.train:
        parser.print_help()
        return
    if params.model.depth not in DEPTHS:
        raise Sorry(f"model.depth={params.model.depth}: choose one of {DEPTHS}")

    # Imported here so that `-c` and `--help` answer without loading torch.
    from dials_diffnet.datasets import DatasetError
    from dials_diffnet.train import train_crystal
    from dials_diffnet.weights import WeightError

    try:
        card = train_crystal(params)
    except (DatasetError, WeightError, ValueError, OSError) as e:
        raise Sorry(str(e)) from None

    training, final = card["training"], card["validation"]
    logger.info("\nTrained %s on %d images (%d validation) in %.0f s on %s",
                card["architecture"], training["n_train"], training["n_val"], training["wall_time_s"], training["device"])
    if final:
        from dials_diffnet.evaluate import format_tables

        logger.info("\nValidation:\n%s", format_tables(final))
    logger.info("\nSaved %s and its model card %s", params.output.weights, pathlib.Path(params.output.weights).with_suffix(".json"))


if __name__ == "__main__":
    run(sys.argv[1:])
