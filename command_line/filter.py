"""diffnet.filter: keep the images diffnet judges worth processing."""

from __future__ import annotations

import collections
import copy
import logging
import os

from dials.util import Sorry, show_mail_handle_errors, tabulate
from libtbx import Auto

from diffnet.predict import (logged_task, make_parser, predict, reject_unhandled, single_cxi, single_inputs,
                             start_log, write_records)
from diffnet.predict import phil_scope as predict_scope
from dials_diffnet.images import iter_image_refs
from dials_diffnet.inference import predict_cxi, resolve_views
from dials_diffnet.results import match_records, read_json, write_experiments, write_reflections
from dials_diffnet.spi.cxi import cxi_length, write_cxi_frames
from dials_diffnet.util import atomic_output, check_outputs, load_phil, one_line, parse_command_line

logger = logging.getLogger("dials.diffnet.filter")

# min_p_hit=Auto for records of a crystal model whose card names no bar (made before session 30): the bar
# session 16 chose, and crystal_fast's under session 30's rule too (docs/commands.md)
FALLBACK_MIN_P_HIT = 0.3

help_message = """
Keep the images that diffnet judges worth processing and write them as a new
experiment list (filtered.expt, plus filtered.refl when reflections are given).

Per-image rules, applied in this order (the first one an image fails is its
reason for being dropped): the image could be judged (keep_failed=False),
P(hit) >= min_p_hit, P(multi-lattice) <= max_p_multi, and predicted
d_min <= d_min. Any rule set to None is not applied; the multi-lattice rule is
off by default (the shipped model's multi-lattice judgement is weak).
task=spi records: P(hit) >= min_p_hit (a particle in the beam, not a blank
frame), then one particle (spi.single_only).

Stills: each kept image keeps its experiment; its ImageSet is rebuilt to hold
that image alone, so the output reloads as exactly the kept images.
Rotation sequences are kept or dropped whole: a sequence is kept when at least
rotation.min_good_fraction of its images pass the rules.

If no diffnet.json is given the prediction runs first, with the same
parameters as diffnet.predict.

task=spi on a CXI file: the kept frames go to output.cxi (filtered.cxi), a copy
of the file holding only them.

Examples::

  diffnet.filter imported.expt diffnet.json d_min=2.5

  diffnet.filter imported.expt strong.refl min_p_hit=0.8

  diffnet.filter run.cxi diffnet.json task=spi
"""


def _filter_phil():
    """The filter's rules and outputs, plus every prediction parameter of diffnet.predict."""
    scope = load_phil("filter")
    for definition in predict_scope.objects:
        if definition.name != "output":
            scope.adopt(definition)
    return scope


phil_scope = _filter_phil()
working_phil = phil_scope


def rejection(record, params) -> str | None:
    """Why one image is dropped, or None if it passes every rule."""
    if not record.ok:
        return None if params.keep_failed else "failed: " + record.failure.split(":")[0]
    # SPI records of a model without a hit head (spi_multi before 0.14.0) carry no P(hit)
    if params.min_p_hit is not None and record.p_hit is not None and record.p_hit < params.min_p_hit:
        return f"not a hit (P(hit) < {params.min_p_hit:g})"
    spi_count = record.get("spi_count")
    if spi_count is not None:
        return None if spi_count == 1 or not params.spi.single_only else f"SPI {spi_count}-particle hit"
    if params.max_p_multi is not None and record.p_multi > params.max_p_multi:
        return f"multi-lattice (P(multi) > {params.max_p_multi:g})"
    if params.d_min is not None and record.d_min > params.d_min:
        return f"d_min worse than {params.d_min:g} A"
    return None


def auto_min_p_hit(models: dict):
    """(bar, where it came from) for min_p_hit=Auto: the bar the judging model's card records (crystal, or
    spi_multi for task=spi)."""
    for name in ("crystal", "spi_multi"):
        card = (models or {}).get(name) or {}
        if card.get("min_p_hit") is not None:
            return card["min_p_hit"], f"the card of {card.get('name')} {card.get('version')}"
    return FALLBACK_MIN_P_HIT, "the default for models whose card records no bar"


def warn_about_rules(params) -> None:
    """Say when a rule the user set will mislead or not apply."""
    if params.max_p_multi is not None and params.task == "crystal":
        logger.warning("max_p_multi: the shipped crystal model's P(multi-lattice) follows the number of spots, "
                       "not lattices (docs/training.md), so this rule drops strong single-lattice shots first")
    if params.task == "spi" and (params.max_p_multi is not None or params.d_min is not None):
        logger.warning("max_p_multi and d_min judge crystal records; task=spi records have neither, so they are "
                       "not applied")


def resolve_min_p_hit(params, models, records) -> None:
    """min_p_hit=Auto becomes the judging model's bar, logged with where it came from."""
    if params.min_p_hit is Auto:
        params.min_p_hit, source = auto_min_p_hit(models)
        if any(r.p_hit is not None for r in records):  # not for SPI records without P(hit), judged by count only
            logger.info(f"min_p_hit={params.min_p_hit:g}, from {source}")


def filter_cxi(params, options, parser, cxi_files, json_in):
    """task=spi on a CXI file (what SPI facilities publish): the frames that pass the rules, copied to output.cxi."""
    cxi, out = single_cxi(params, cxi_files), params.output
    check_outputs({"output.cxi": out.cxi, "output.json": out.json if json_in is None else None,
                   "output.log": out.log}, inputs=[cxi, json_in])
    if not out.cxi:
        raise Sorry("output.cxi must name a file")
    start_log(logger, parser, options, out.log)
    warn_about_rules(params)
    n_frames = cxi_length_or_sorry(cxi)
    if json_in:
        header, records = read_json(json_in)
        if header.get("inputs", {}).get("experiments") != os.path.abspath(cxi) or len(records) != n_frames:
            raise Sorry(f"{json_in} does not hold the records of the {n_frames} frames of {cxi}")
        models = header.get("models")
        logger.info(f"Using the records of {json_in}")
    else:
        task = logged_task(params)
        records = predict_cxi(task, cxi, batch_size=params.batch_size)
        models = task.models
        if out.json:
            write_records(out.json, task, records, "diffnet.filter", cxi, None)
            logger.info(f"Saved per-image records to {out.json}")
    resolve_min_p_hit(params, models, records)
    reasons = [rejection(r, params) for r in records]
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    with atomic_output(out.cxi) as tmp:
        write_cxi_frames(cxi, tmp, kept)
    logger.info(f"Saved {len(kept)} of {n_frames} frames to {out.cxi}")
    logger.info("\n" + counts_table(collections.Counter(reason or "kept" for reason in reasons), {}))


def cxi_length_or_sorry(path) -> int:
    try:
        return cxi_length(path)
    except (OSError, KeyError) as e:
        raise Sorry(f"cannot read {path}: {one_line(str(e))}") from None


def is_rotation(experiment) -> bool:
    return experiment.scan is not None and experiment.scan.get_num_images() > 1


def choose_experiments(experiments, refs, records, params):
    """(indices of kept experiments, Counter of image reasons, Counter of rotation-sequence outcomes)."""
    reasons = [rejection(r, params) for r in records]
    images_of = collections.defaultdict(list)
    for ref, reason in zip(refs, reasons):
        images_of[ref.experiment_index].append(reason)
    kept, image_counts, sweep_counts = [], collections.Counter(), collections.Counter()
    for i_expt, expt_reasons in sorted(images_of.items()):
        image_counts.update(r or "kept" for r in expt_reasons)
        if is_rotation(experiments[i_expt]):
            good = sum(r is None for r in expt_reasons) / len(expt_reasons)
            bar = params.rotation.min_good_fraction  # None: the rule is off, every sequence is kept
            keep = bar is None or good >= bar
            sweep_counts["kept" if keep else f"dropped (< {bar:g} of images pass)"] += 1
        else:
            keep = expt_reasons[0] is None
        if keep:
            kept.append(i_expt)
    return kept, image_counts, sweep_counts


def isolate_still_imagesets(experiments, refs, kept):
    """Give each kept still an ImageSet of its own image only.

    Stills imported together share one ImageSet (or one ImageSequence with one-image scans);
    written out as they are, the shared set would reload with the dropped images too.
    """
    ref_of = {ref.experiment_index: ref for ref in refs}
    for i in kept:
        expt = experiments[i]
        ref = ref_of[i]
        if not is_rotation(expt) and len(ref.imageset) > 1:
            # an ImageSequence slices by array index (its scan's frame counted from 0), an ImageSet by position
            start = ref.index + (ref.imageset.get_array_range()[0] if hasattr(ref.imageset, "get_array_range") else 0)
            expt.imageset = ref.imageset[start : start + 1]


def counts_table(image_counts, sweep_counts) -> str:
    rows = [[reason, n] for reason, n in sorted(image_counts.items(), key=lambda kv: (kv[0] != "kept", kv[0]))]
    text = tabulate(rows, ["images", "count"])
    if sweep_counts:
        text += "\n" + tabulate([[k, n] for k, n in sorted(sweep_counts.items())], ["rotation sequences", "count"])
    return text


def json_argument(unhandled):
    jsons = [a for a in unhandled if a.endswith(".json")]
    if len(jsons) > 1:
        raise Sorry(f"give at most one diffnet.json, not {len(jsons)}")
    return jsons[0] if jsons else None


@show_mail_handle_errors()
def run(args=None, phil=working_phil):
    usage = "diffnet.filter [options] [param.phil] imported.expt [strong.refl] [diffnet.json] | run.cxi [diffnet.json]"
    parser = make_parser(phil, usage, help_message)
    params, options, unhandled = parse_command_line(parser, args)
    json_in = json_argument(unhandled)
    cxi_files = [a for a in unhandled if a.endswith(".cxi") and os.path.isfile(a)]
    reject_unhandled(unhandled, accepted=[json_in, *cxi_files])
    params.views = resolve_views(params.views, params.task)
    if cxi_files:
        return filter_cxi(params, options, parser, cxi_files, json_in)
    if not params.input.experiments and not params.input.reflections:
        parser.print_help()
        return
    experiments, expt_path, reflections, refl_path = single_inputs(params)
    out = params.output
    check_outputs(
        {
            "output.experiments": out.experiments,
            "output.reflections": out.reflections if reflections is not None else None,
            "output.json": out.json if json_in is None else None,
            "output.log": out.log,
        },
        inputs=[expt_path, refl_path, json_in],
    )
    if not out.experiments:
        raise Sorry("output.experiments must name a file")

    start_log(logger, parser, options, out.log)
    warn_about_rules(params)

    if len(set(experiments.identifiers())) != len(experiments) or "" in experiments.identifiers():
        raise Sorry(f"{expt_path} lacks unique experiment identifiers; re-import the images with dials.import")
    refs = list(iter_image_refs(experiments))
    if json_in:
        header, records = read_json(json_in)
        records = match_records(records, refs, json_in)
        models = header.get("models")
        logger.info(f"Using the records of {json_in}")
    else:
        task, records = predict(params, experiments, expt_path)
        models = task.models
        if out.json:
            write_records(out.json, task, records, "diffnet.filter", expt_path, refl_path)
            logger.info(f"Saved per-image records to {out.json}")
    resolve_min_p_hit(params, models, records)

    kept, image_counts, sweep_counts = choose_experiments(experiments, refs, records, params)
    isolate_still_imagesets(experiments, refs, kept)
    kept_ids = [experiments[i].identifier for i in kept]
    filtered = copy.copy(experiments)  # a new list of the same experiments: the selection works in place
    filtered.select_on_experiment_identifiers(kept_ids)
    write_experiments(filtered, out.experiments)
    logger.info(f"Saved {len(filtered)} of {len(experiments)} experiments to {out.experiments}")

    if reflections is not None and out.reflections:
        reflections = reflections.select_on_experiment_identifiers(kept_ids)
        reflections.reset_ids()
        if not reflections.are_experiment_identifiers_consistent(filtered):
            raise Sorry("filtered reflections and experiments disagree on identifiers (please report this)")
        write_reflections(reflections, out.reflections)
        logger.info(f"Saved {len(reflections)} reflections to {out.reflections}")

    logger.info("\n" + counts_table(image_counts, sweep_counts))
    if not filtered:
        logger.warning("No images passed the rules; the filtered experiment list is empty.")


if __name__ == "__main__":
    run()
