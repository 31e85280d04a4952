"""Per-image records: what diffnet says about each image, written as JSON, a table and reflection columns."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import statistics

import numpy as np
from dials.array_family import flex
from dials.util import Sorry, tabulate

from dials_diffnet.util import atomic_output, write_text_atomic

RECORDS_FORMAT = "dials-diffnet-records"
RECORDS_FORMAT_VERSION = 1
COLUMN_PREFIX = "diffnet_"


@dataclasses.dataclass
class ImageRecord:
    """One image's verdict. Prediction fields are None when `ok` is False; `failure` then says why."""

    experiment_identifier: str
    experiment_index: int
    path: str
    image_index: int  # index into the experiment's ImageSet
    image_number: int  # 1-based frame number, as DIALS prints it
    ok: bool = True
    failure: str | None = None
    d_min: float | None = None  # Angstrom, = 1 / s_min
    s_min: float | None = None  # 1/Angstrom
    p_multi: float | None = None
    p_hit: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # task-specific fields (SPI)

    KEYS = ("experiment_identifier", "experiment_index", "path", "image_index", "image_number", "ok", "failure")

    @property
    def key(self):
        return (self.experiment_identifier, self.path, self.image_index)

    def get(self, field):
        return self.extra.get(field) if field not in self.__dataclass_fields__ else getattr(self, field)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRecord":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in cls.KEYS if k not in d]
        if missing:
            raise ValueError(f"record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})


def failed_record(ref, reason: str) -> ImageRecord:
    return ImageRecord(**_ref_fields(ref), ok=False, failure=reason)


def predicted_record(ref, fields: dict) -> ImageRecord:
    names = {f.name for f in dataclasses.fields(ImageRecord)}
    known = {k: v for k, v in fields.items() if k in names}
    return ImageRecord(**_ref_fields(ref), **known, extra={k: v for k, v in fields.items() if k not in names})


def _ref_fields(ref) -> dict:
    return dict(
        experiment_identifier=ref.identifier,
        experiment_index=ref.experiment_index,
        path=ref.path,
        image_index=ref.index,
        image_number=ref.image_number,
    )


# --- diffnet.json ---------------------------------------------------------------------------


def write_json(path, records, *, program, version, task, models, inputs) -> None:
    """The records file. No time stamps, so a rerun on the same input gives the same bytes."""
    document = {
        "format": RECORDS_FORMAT,
        "format_version": RECORDS_FORMAT_VERSION,
        "program": program,
        "version": version,
        "task": task,
        "models": models,
        "inputs": inputs,
        "records": [r.as_dict() for r in records],
    }
    write_text_atomic(path, json.dumps(document, indent=1, allow_nan=False) + "\n")


def read_json(path) -> tuple[dict, list[ImageRecord]]:
    """(document header, records); Sorry for anything that is not a diffnet records file."""
    try:
        with open(path) as f:
            document = json.load(f)
    except (OSError, ValueError) as e:
        raise Sorry(f"cannot read {path}: {e}") from None
    if not isinstance(document, dict) or document.get("format") != RECORDS_FORMAT:
        raise Sorry(f"{path} is not a diffnet records file (no format={RECORDS_FORMAT!r})")
    if document.get("format_version") != RECORDS_FORMAT_VERSION:
        raise Sorry(f"{path} has records format version {document.get('format_version')}, expected {RECORDS_FORMAT_VERSION}")
    try:
        records = [ImageRecord.from_dict(d) for d in document["records"]]
    except (KeyError, TypeError, ValueError) as e:
        raise Sorry(f"{path} has malformed records: {e}") from None
    return document, records


def match_records(records, refs, json_path) -> list[ImageRecord]:
    """The record of every image in `refs`, in that order; Sorry if the json describes other images.

    Images are matched on experiment identifier, file path and index, so a json from another
    import (other identifiers) or other files is refused rather than silently misapplied.
    """
    by_key = {r.key: r for r in records}
    matched = [by_key.get((ref.identifier, ref.path, ref.index)) for ref in refs]
    missing = sum(r is None for r in matched)
    if missing:
        raise Sorry(
            f"{json_path} does not describe these experiments: {missing} of {len(refs)} images have no record "
            "(experiment identifiers or image paths differ); rerun diffnet.predict on them"
        )
    return matched


# --- readable table and summary ---------------------------------------------------------------


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


# (header, field, format) of the table's columns after the image's place; SPI records have their own
SPI_COLUMNS = (("P(hit)", "p_hit", ".3f"), ("count", "spi_count", "d"), ("P(single)", "spi_p_single", ".3f"),
               ("type", "spi_type", "s"), ("few-shot", "spi_fewshot_label", "s"))
CRYSTAL_COLUMNS = (("d_min", "d_min", ".2f"), ("P(multi)", "p_multi", ".3f"), ("P(hit)", "p_hit", ".3f"))


def records_table(records) -> str:
    spi = any(r.get("spi_count") is not None for r in records)
    columns = [c for c in SPI_COLUMNS if any(r.get(c[1]) is not None for r in records)] if spi else CRYSTAL_COLUMNS
    rows = [
        [r.experiment_index, os.path.basename(r.path), r.image_number]
        + [_fmt(r.get(field), spec) for _, field, spec in columns]
        + ["" if r.ok else r.failure]
        for r in records
    ]
    return tabulate(rows, ["expt", "file", "image", *(header for header, _, _ in columns), "failure"])


def write_table(path, records) -> None:
    write_text_atomic(path, records_table(records) + "\n")


def summary_table(records, multi_threshold: float, hit_threshold: float) -> str:
    good = [r for r in records if r.ok]
    rows = [["images", len(records)], ["predicted", len(good)], ["failed", len(records) - len(good)]]
    crystal = [r for r in good if r.d_min is not None]
    if crystal:
        d_min = [r.d_min for r in crystal]
        rows += [
            ["mean d_min (A)", _fmt(statistics.fmean(d_min), ".2f")],
            ["median d_min (A)", _fmt(statistics.median(d_min), ".2f")],
            [f"multi-lattice (P > {multi_threshold:g})", sum(r.p_multi > multi_threshold for r in crystal)],
            [f"hits (P >= {hit_threshold:g})", sum(r.p_hit >= hit_threshold for r in crystal)],
        ]
    spi = [r for r in good if r.get("spi_count") is not None]
    if spi and spi[0].p_hit is not None:
        rows += [[f"SPI hits (P >= {hit_threshold:g})", sum(r.p_hit >= hit_threshold for r in spi)]]
        spi = [r for r in spi if r.p_hit >= hit_threshold]
    counts = collections.Counter(r.get("spi_count") for r in spi)
    rows += [[f"SPI {n}-particle hits", counts[n]] for n in sorted(counts)]
    return tabulate(rows, ["", "count"])


# --- reflections ------------------------------------------------------------------------------


def check_reflections_belong(reflections, experiments, refl_path) -> None:
    """Sorry unless every reflection's id names an experiment with the same identifier."""
    if len(reflections) == 0:
        return
    if "id" not in reflections:
        raise Sorry(f"{refl_path} has no id column, so its reflections cannot be matched to experiments")
    ids = set(reflections["id"]) - {-1}
    if ids and (min(ids) < 0 or max(ids) >= len(experiments)):
        raise Sorry(f"{refl_path} has reflections for experiment ids {sorted(ids)[:5]}…, "
                    f"but only {len(experiments)} experiments were given: it belongs to other experiments")
    identifiers = dict(reflections.experiment_identifiers())
    for i in ids:
        expected = experiments[i].identifier
        if identifiers and identifiers.get(i) != expected:
            raise Sorry(f"{refl_path} does not belong to these experiments: id {i} is "
                        f"{identifiers.get(i)!r} in the reflections but {expected!r} in the experiments")


def annotate_reflections(reflections, experiments, records, fields) -> None:
    """Add numeric columns diffnet_<field> (NaN where the image failed) and diffnet_ok (1/0).

    Each reflection takes its image's values: a still's image is its experiment; in a rotation
    sequence the frame is the integer part of the observed z (frames count from the scan's
    array start, as in DIALS).
    """
    n = len(reflections)
    row_of = {(r.experiment_index, r.image_index): i for i, r in enumerate(records)}
    first_image = {}  # experiment index -> image index of its (still's only) record
    for r in records:
        first_image.setdefault(r.experiment_index, r.image_index)
    ids = np.asarray(reflections["id"], dtype=np.int64)
    frame = np.zeros(n, dtype=np.int64)
    if "xyzobs.px.value" in reflections and n:
        z = np.asarray(reflections["xyzobs.px.value"].parts()[2])
        frame = np.floor(np.nan_to_num(z)).astype(np.int64)
    row = np.full(n, -1, dtype=np.int64)
    for i_expt in np.unique(ids):
        if i_expt < 0 or i_expt >= len(experiments):
            continue
        sel = ids == i_expt
        expt = experiments[int(i_expt)]
        if expt.scan is not None and expt.scan.get_num_images() > 1:
            start = expt.scan.get_array_range()[0]
            n_images = expt.scan.get_num_images()
            index = np.clip(frame[sel] - start, 0, n_images - 1)
            row[sel] = [row_of.get((int(i_expt), int(k)), -1) for k in index]
        else:
            row[sel] = row_of.get((int(i_expt), first_image.get(int(i_expt))), -1)
    found = row >= 0
    for field in fields:
        values = np.array([math.nan if r.get(field) is None else float(r.get(field)) for r in records] + [math.nan])
        reflections[COLUMN_PREFIX + field] = flex.double(values[row].tolist())
    ok = np.array([int(r.ok) for r in records] + [0])
    reflections[COLUMN_PREFIX + "ok"] = flex.int(ok[np.where(found, row, -1)].astype(int).tolist())


def write_reflections(reflections, path) -> None:
    with atomic_output(path) as tmp:
        reflections.as_file(tmp)


def write_experiments(experiments, path) -> None:
    with atomic_output(path) as tmp:
        experiments.as_file(tmp)
