"""diffnet.evaluate: metrics of the crystallography model on a labelled dataset."""

from __future__ import annotations

import logging
import pathlib
import sys

from dials.util import Sorry, log, show_mail_handle_errors
from dials.util.options import ArgumentParser

from dials_diffnet.util import load_phil, parse_command_line

logger = logging.getLogger("dials.diffnet.evaluate")

working_phil = load_phil("evaluate")

help_message = """
Evaluate the crystallography model on labelled datasets written by
diffnet.simulate (index.json + shards): resolution (Pearson r on 1/d and d,
MAE, median |dd|/d, fraction within 10%; over hits, edge-limited labels
separately), multi-lattice and hit classification (accuracy, precision,
recall, ROC AUC, confusion; multi-lattice recall against misorientation and
the weaker lattice's share). Writes diffnet.evaluate.json and prints a table.

With predictions=diffnet.json (from diffnet.predict on diffnet.simulate CBF
images) it judges those predictions against the simulation labels, and with
dials_baseline=True compares with DIALS's own per-image estimate.

Examples::

  diffnet.evaluate sim/test

  diffnet.evaluate predictions=diffnet.json dials_baseline=True

  diffnet.evaluate data=sim/test_eiger model.crystal=crystal.safetensors
"""


@show_mail_handle_errors()
def run(args=None, phil=working_phil):
    parser = ArgumentParser(usage="diffnet.evaluate [options] dataset_dir ...", phil=phil, epilog=help_message)
    params, options, unhandled = parse_command_line(parser, args)
    for arg in unhandled:
        if not (pathlib.Path(arg) / "index.json").is_file():
            raise Sorry(f"Unrecognised argument {arg!r} (not a parameter, nor a dataset directory with index.json)")
        params.data.append(arg)
    log.config(verbosity=options.verbose, logfile=params.output.log)
    if parser.diff_phil.as_str():
        logger.info("The following parameters have been modified:\n%s", parser.diff_phil.as_str())
    if params.predictions:
        return evaluate_predictions(params)
    if not params.data:
        parser.print_help()
        return

    import torch

    from dials_diffnet import evaluate
    from dials_diffnet.datasets import DatasetError, ShardDataset
    from dials_diffnet.inference import resolve_views
    from dials_diffnet.models.views import ViewAveraged
    from dials_diffnet.weights import WeightError, card_planes, load_model, shipped_path

    weights = params.model.crystal or shipped_path("crystal")
    views = resolve_views(params.views, "crystal")
    try:
        if params.threads:
            torch.set_num_threads(params.threads)
        device = evaluate.resolve_device(params.device)
        model, card = load_model(weights, device)
        dataset = ShardDataset(params.data, planes=card_planes(card))
        if list(dataset.grid) != card.get("grid", list(dataset.grid)):
            raise Sorry(f"dataset grid {list(dataset.grid)} differs from the model's {card['grid']}")
        metrics, _ = evaluate.evaluate_crystal(ViewAveraged(model, views), dataset, device, params.batch_size,
                                               params.workers)
        result = {
            "model": {"path": str(weights), "name": card.get("name"), "architecture": card["architecture"],
                      "sha256": card["sha256"], "views": views},
            "data": [str(pathlib.Path(d).resolve()) for d in params.data],
            **metrics,
        }
        evaluate.write_json(params.output.json, result)
    except (DatasetError, WeightError, ValueError, OSError) as e:
        raise Sorry(str(e)) from None

    logger.info("\nModel %s (%d views) on %d images from %s\n", weights, views, metrics["n_images"], ", ".join(params.data))
    logger.info(evaluate.format_tables(metrics))
    logger.info("\nSaved metrics to %s", params.output.json)


def evaluate_predictions(params):
    from dials_diffnet import evaluate

    try:
        metrics, rows = evaluate.evaluate_records(params.predictions, with_dials=params.dials_baseline)
        evaluate.write_json(params.output.json, {"predictions": str(params.predictions), "metrics": metrics, "images": rows})
    except (ValueError, OSError, RuntimeError) as e:
        raise Sorry(str(e)) from None
    logger.info(evaluate.format_records_table(rows))
    logger.info("\n" + evaluate.format_tables(metrics))
    if "against_dials" in metrics:
        against = metrics["against_dials"]["resolution"]
        logger.info(
            "\nResolution on images both estimated: model r(1/d) %.3f, median |dd|/d %.3f; DIALS r(1/d) %.3f, median |dd|/d %.3f",
            against["model_on_common"]["pearson_r_inv_d"], against["model_on_common"]["median_rel_err_d"],
            against["dials_on_common"]["pearson_r_inv_d"], against["dials_on_common"]["median_rel_err_d"],
        )
    logger.info("\nSaved metrics to %s", params.output.json)


if __name__ == "__main__":
    run(sys.argv[1:])
