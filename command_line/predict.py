"""diffnet.predict: judge every image of an experiment list with the diffnet models."""

from __future__ import annotations

import importlib.metadata
import logging
import os

import libtbx

from dials.util import Sorry, log, show_mail_handle_errors
from dials.util.options import ArgumentParser
from dials.util.version import dials_version

from dials_diffnet.images import iter_image_refs
from dials_diffnet.inference import available_cores, make_task, predict_cxi, predict_images, resolve_views
from dials_diffnet.results import (
    annotate_reflections,
    check_reflections_belong,
    records_table,
    summary_table,
    write_experiments,
    write_json,
    write_reflections,
    write_table,
)
from dials_diffnet.util import check_outputs, load_phil, parse_command_line

logger = logging.getLogger("dials.diffnet.predict")

help_message = """
Judge every image of an experiment list with convolutional networks: for
task=crystal, the resolution limit d_min (Angstrom), the probability that more
than one lattice diffracts, and the probability that the image is a hit. Images
that cannot be judged (unreadable, blank, saturated, ...) are flagged as failed
with a reason; the run goes on.

Writes per-image records (diffnet.json and diffnet.txt), the experiments
unchanged (diffnet.expt) and, when reflections are given, the reflections with
numeric columns diffnet_d_min, diffnet_p_multi, diffnet_p_hit and diffnet_ok
carrying their image's results (diffnet.refl).

Examples::

  diffnet.predict imported.expt

  diffnet.predict imported.expt strong.refl nproc=4 device=cuda

  python -m diffnet.predict imported.expt batch_size=64
"""

phil_scope = load_phil("predict")
working_phil = phil_scope


def package_version() -> str:
    try:
        return importlib.metadata.version("dials-diffnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def make_parser(phil, usage, epilog):
    # check_format=False: the image files are opened by the readers, one image at a time,
    # so a missing or broken file flags that image instead of refusing the whole list.
    return ArgumentParser(
        usage=usage, phil=phil, epilog=epilog, read_experiments=True, read_reflections=True, check_format=False
    )


def start_log(command_logger, parser, options, logfile):
    """Configure the DIALS log; open it with the DIALS and dials-diffnet versions and the modified parameters."""
    log.config(verbosity=options.verbose, logfile=logfile)
    command_logger.info(dials_version())
    command_logger.info(f"dials-diffnet {package_version()}")
    diff_phil = parser.diff_phil.as_str()
    if diff_phil:
        command_logger.info("The following parameters have been modified:\n\n" + diff_phil)


def single_inputs(params):
    """(experiments, expt_path, reflections or None, refl_path or None); Sorry unless one .expt, at most one .refl."""
    if len(params.input.experiments) != 1:
        raise Sorry(f"give exactly one experiments file (.expt), not {len(params.input.experiments)}")
    if len(params.input.reflections) > 1:
        raise Sorry(f"give at most one reflections file (.refl), not {len(params.input.reflections)}")
    expt_in = params.input.experiments[0]
    if len(expt_in.data) == 0:
        raise Sorry(f"{expt_in.filename} contains no experiments")
    if params.input.reflections:
        refl_in = params.input.reflections[0]
        check_reflections_belong(refl_in.data, expt_in.data, refl_in.filename)
        return expt_in.data, expt_in.filename, refl_in.data, refl_in.filename
    return expt_in.data, expt_in.filename, None, None


def reject_unhandled(unhandled, accepted=()):
    rest = [a for a in unhandled if a not in accepted]
    # e.g. output.no_such=1: the PHIL parser passes on a name inside a known scope
    for a in rest:
        if "=" in a and not os.path.exists(a):
            raise Sorry(f"unknown parameter {a.split('=', 1)[0]!r} (-c lists the parameters)")
    if rest:
        missing = [a for a in rest if not os.path.exists(a)]
        what = "no such file" if missing else "not an experiments, reflections or PHIL file, nor a parameter"
        raise Sorry(f"cannot use {' '.join(rest)}: {what}")


def logged_task(params):
    """The task params name, its device and models logged."""
    task = make_task(params.task, params, params.device)
    logger.info(f"Task {task.name} on {task.device}: " + ", ".join(f"{m['name']} {m['version']}" for m in task.models.values()))
    return task


def predict(params, experiments, expt_path):
    """(task, records) for every image of `experiments` (read from expt_path by the readers)."""
    task = logged_task(params)
    refs = list(iter_image_refs(experiments))
    if params.nproc in (None, libtbx.Auto):
        params.nproc = max(1, available_cores() // 2)
    logger.info(f"Judging {len(refs)} images, batch_size={params.batch_size}, nproc={params.nproc}")
    records = predict_images(
        task,
        expt_path,
        refs,
        batch_size=params.batch_size,
        nproc=params.nproc,
        max_saturated_fraction=params.image_checks.max_saturated_fraction,
    )
    return task, records


def write_records(path, task, records, program, expt_path, refl_path):
    write_json(
        path,
        records,
        program=program,
        version=package_version(),
        task=task.name,
        models=task.models,
        inputs={
            "experiments": os.path.abspath(expt_path),
            "reflections": os.path.abspath(refl_path) if refl_path else None,
        },
    )


@show_mail_handle_errors()
def run(args=None, phil=working_phil):
    usage = "diffnet.predict [options] [param.phil] imported.expt [strong.refl]"
    parser = make_parser(phil, usage, help_message)
    params, options, unhandled = parse_command_line(parser, args)
    cxi_files = [a for a in unhandled if a.endswith(".cxi") and os.path.isfile(a)]
    reject_unhandled(unhandled, accepted=cxi_files)
    params.views = resolve_views(params.views, params.task)
    if cxi_files:
        return run_cxi(params, options, parser, cxi_files)
    if not params.input.experiments and not params.input.reflections:
        parser.print_help()
        return
    experiments, expt_path, reflections, refl_path = single_inputs(params)
    out = params.output
    check_outputs(
        {
            "output.experiments": out.experiments,
            "output.reflections": out.reflections if reflections is not None else None,
            "output.json": out.json,
            "output.table": out.table,
            "output.log": out.log,
        },
        inputs=[expt_path, refl_path],
    )

    start_log(logger, parser, options, out.log)
    task, records = predict(params, experiments, expt_path)

    if out.json:
        write_records(out.json, task, records, "diffnet.predict", expt_path, refl_path)
        logger.info(f"Saved per-image records to {out.json}")
    if out.table:
        write_table(out.table, records)
        logger.info(f"Saved the records table to {out.table}")
    if out.experiments:
        write_experiments(experiments, out.experiments)
        logger.info(f"Saved experiments to {out.experiments}")
    if reflections is not None and out.reflections:
        annotate_reflections(reflections, experiments, records, task.reflection_columns)
        write_reflections(reflections, out.reflections)
        logger.info(f"Saved {len(reflections)} annotated reflections to {out.reflections}")

    logger.debug(records_table(records))
    logger.info("\n" + summary_table(records, params.summary.multi_threshold, params.summary.hit_threshold))


def single_cxi(params, cxi_files) -> str:
    """The one CXI file of a task=spi run; Sorry for anything else."""
    if params.task != "spi":
        raise Sorry("CXI input is for task=spi")
    if len(cxi_files) != 1 or params.input.experiments or params.input.reflections:
        raise Sorry("give exactly one CXI file (and no experiment list or reflections)")
    return cxi_files[0]


def run_cxi(params, options, parser, cxi_files):
    """task=spi on CXI files (what SPI facilities publish) instead of an experiment list."""
    cxi, out = single_cxi(params, cxi_files), params.output
    check_outputs({"output.json": out.json, "output.table": out.table, "output.log": out.log}, inputs=[cxi])
    start_log(logger, parser, options, out.log)
    task = logged_task(params)
    records = predict_cxi(task, cxi, batch_size=params.batch_size)
    if out.json:
        write_records(out.json, task, records, "diffnet.predict", cxi, None)
        logger.info(f"Saved per-image records to {out.json}")
    if out.table:
        write_table(out.table, records)
        logger.info(f"Saved the records table to {out.table}")
    logger.info("\n" + summary_table(records, params.summary.multi_threshold, params.summary.hit_threshold))


if __name__ == "__main__":
    run()
