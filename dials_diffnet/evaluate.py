"""Judge a crystallography model on labelled data, and DIALS on the same images.

Metrics are plain numpy functions of predictions and labels (AUC, Pearson r,
resolution errors, confusion matrices), so training's validation, the
`diffnet.evaluate` command and the DIALS comparison share one definition.

Resolution metrics are taken over hits only. Labels limited by the detector
edge say "at least this good", so they are left out of the symmetric metrics
and reported on their own (how often the model says at least as good).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np
import torch

logger = logging.getLogger("dials.diffnet.evaluate")

# Default bin edges for accuracy against misorientation (degrees) and the weaker lattice's share.
MISORIENTATION_BINS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 180.0)
MINORITY_SHARE_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
# Bin edges for how often a crystal is called a hit against its detectable spots (a hit has >= 10).
DETECTABLE_SPOT_BINS = (0, 5, 10, 15, 20, 30, 50, 100, np.inf)
# Bin edges for the resolution error of hits against their detectable spots: few spots, little to read a falloff from.
RESOLUTION_SPOT_BINS = (10, 20, 50, 100, 300, np.inf)
# Hits are split into this many strata of similar detectable-spot count to judge multi-lattice calls.
MULTI_SPOT_STRATA = 10
DIALS_MIN_SPOTS_FOR_HIT = 10  # what dials.ssx_index needs to try indexing
# diffnet.filter min_p_hit values worth knowing the cost of, most permissive last: the candidates of the rule
# that chose the shipped models' bars (docs/commands.md; crystal 0.15, crystal_fast 0.3).
HIT_OPERATING_POINTS = (0.5, 0.3, 0.2, 0.15, 0.1, 0.05)


# ---------------------------------------------------------------- metric functions


def pearson_r(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def roc_auc(scores, truth) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (Mann-Whitney U from average ranks)."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    n_pos = int(truth.sum())
    n_neg = len(truth) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, tie_group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # 1-based rank of each tie group's last member
    average_rank = (last_rank - (counts - 1) / 2.0)[tie_group]
    u = average_rank[truth].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_metrics(probability, truth, threshold=0.5) -> dict:
    probability, truth = np.asarray(probability, np.float64), np.asarray(truth, bool)
    said = probability >= threshold
    tp, fp = int((said & truth).sum()), int((said & ~truth).sum())
    fn, tn = int((~said & truth).sum()), int((~said & ~truth).sum())
    n = len(truth)
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "n": n,
        "n_positive": tp + fn,
        "accuracy": _ratio(tp + tn, n),
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "specificity": specificity,
        "roc_auc": roc_auc(probability, truth),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def hit_operating_points(p_hit, is_hit, has_crystal, thresholds=HIT_OPERATING_POINTS) -> list:
    """What each diffnet.filter min_p_hit keeps: hits, shots with no crystal, crystals with too few
    spots for a hit; and the accuracy of hit vs no crystal and of hit vs non-hit at that bar."""
    p_hit, is_hit, has_crystal = np.asarray(p_hit), np.asarray(is_hit, bool), np.asarray(has_crystal, bool)
    empty, near_miss = ~has_crystal, has_crystal & ~is_hit

    def share(mask, kept):
        return _ratio(kept[mask].sum(), mask.sum())

    rows = []
    for threshold in thresholds:
        kept = p_hit >= threshold
        rows.append({"min_p_hit": threshold, "hits_kept": share(is_hit, kept), "empty_kept": share(empty, kept),
                     "near_misses_kept": share(near_miss, kept),
                     "hit_vs_empty_accuracy": share(is_hit | empty, kept == is_hit),
                     "hit_accuracy": _ratio((kept == is_hit).sum(), len(is_hit))})
    return rows


def resolution_metrics(s_pred, s_true) -> dict:
    """Agreement of predicted and true resolution, given both as 1/d (1/Angstrom)."""
    s_pred, s_true = np.asarray(s_pred, np.float64), np.asarray(s_true, np.float64)
    d_pred, d_true = 1.0 / s_pred, 1.0 / s_true
    relative = np.abs(d_pred - d_true) / d_true
    empty = len(s_true) == 0
    return {
        "n": len(s_true),
        "pearson_r_inv_d": pearson_r(s_pred, s_true),
        "pearson_r_d": pearson_r(d_pred, d_true),
        "mae_d": float("nan") if empty else float(np.abs(d_pred - d_true).mean()),
        "mae_inv_d": float("nan") if empty else float(np.abs(s_pred - s_true).mean()),
        "median_rel_err_d": float("nan") if empty else float(np.median(relative)),
        "fraction_within_10pct": float("nan") if empty else float((relative <= 0.10).mean()),
    }


def edge_limited_metrics(s_pred, s_label) -> dict:
    """For 'at least this good' labels: how often the model agrees (within 10% in d)."""
    s_pred, s_label = np.asarray(s_pred, np.float64), np.asarray(s_label, np.float64)
    if len(s_label) == 0:
        return {"n": 0, "fraction_at_least_as_good": float("nan"), "median_shortfall_rel_d": float("nan")}
    shortfall = np.maximum(1.0 / s_pred - 1.0 / s_label, 0.0) * s_label  # relative, in d
    return {
        "n": len(s_label),
        "fraction_at_least_as_good": float((shortfall <= 0.10).mean()),
        "median_shortfall_rel_d": float(np.median(shortfall)),
    }


def bin_masks(values, edges):
    """(lo, hi, mask) for each bin [lo, hi) of `values` (the last bin closed)."""
    values = np.asarray(values, np.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        yield float(lo), float(hi), (values >= lo) & ((values < hi) if hi != edges[-1] else (values <= hi))


def binned_accuracy(correct, values, edges, name="accuracy") -> list[dict]:
    """Fraction of true flags (`correct`) in each bin [lo, hi) of `values` (the last bin closed)."""
    correct = np.asarray(correct, bool)
    return [{"lo": lo, "hi": hi, "n": int(inside.sum()), name: _ratio(correct[inside].sum(), inside.sum())}
            for lo, hi, inside in bin_masks(values, edges)]


def crystal_metrics(predictions: dict, labels: dict, summary_only=False) -> dict:
    """All crystallography metrics. predictions: s_min, p_multi, p_hit arrays; labels: datasets.LABELS arrays."""
    hit = np.asarray(labels["is_hit"], bool)
    edge = np.asarray(labels["edge_limited"], bool)
    symmetric, edge_only = hit & ~edge, hit & edge
    s_pred, s_true = np.asarray(predictions["s_min"]), np.asarray(labels["s_min"])
    multi = binary_metrics(predictions["p_multi"][hit], labels["is_multi"][hit])
    metrics = {
        "n_images": len(hit),
        "resolution": resolution_metrics(s_pred[symmetric], s_true[symmetric]),
        "resolution_edge_limited": edge_limited_metrics(s_pred[edge_only], s_true[edge_only]),
        "multi_lattice": multi,
        "hit": binary_metrics(predictions["p_hit"], hit),
    }
    if not summary_only:
        # "hit" counts a crystal with fewer detectable spots than a hit needs as a non-hit; split
        # those near misses from shots with no crystal at all.
        crystal = np.asarray(labels["n_lattices"]) > 0
        called = np.asarray(predictions["p_hit"]) >= 0.5
        metrics["hit_vs_empty"] = binary_metrics(predictions["p_hit"][hit | ~crystal], hit[hit | ~crystal])
        near_miss = crystal & ~hit
        metrics["hit_near_misses"] = {"n": int(near_miss.sum()),
                                      "fraction_called_hit": float(called[near_miss].mean()) if near_miss.any() else None}
        metrics["hit_operating_points"] = hit_operating_points(predictions["p_hit"], hit, crystal)
        n_detectable = np.asarray(labels.get("n_detectable", np.full(len(hit), -1)))
        counts_stored = (n_detectable[crystal] >= 0).all()  # shards written before the count was stored lack it
        if counts_stored:
            # below 10 spots this is the false-hit rate, from 10 up the recall: where the boundary blurs
            metrics["hit_called_by_detectable_spots"] = binned_accuracy(
                called[crystal], n_detectable[crystal], DETECTABLE_SPOT_BINS, name="fraction_called_hit"
            )
            metrics["resolution_by_detectable_spots"] = [
                {"lo": lo, "hi": hi, **resolution_metrics(s_pred[symmetric & inside], s_true[symmetric & inside])}
                for lo, hi, inside in bin_masks(n_detectable, RESOLUTION_SPOT_BINS)
            ]
        correct = (predictions["p_multi"][hit] >= 0.5) == labels["is_multi"][hit]
        is_multi = np.asarray(labels["is_multi"][hit], bool)
        if counts_stored:  # hits are crystals
            multi.update(spot_count_controls(predictions["p_multi"][hit], is_multi, n_detectable[hit]))
        multi["accuracy_by_misorientation_deg"] = binned_accuracy(
            correct[is_multi], labels["misorientation_deg"][hit][is_multi], MISORIENTATION_BINS
        )
        multi["accuracy_by_minority_share"] = binned_accuracy(
            correct[is_multi], labels["minority_share"][hit][is_multi], MINORITY_SHARE_BINS
        )
        metrics["by_detector"] = {
            str(name): resolution_metrics(s_pred[symmetric & (labels["detector"] == name)], s_true[symmetric & (labels["detector"] == name)])
            for name in np.unique(labels["detector"])
        }
    return metrics


def spot_count_controls(p_multi, is_multi, n_detectable) -> dict:
    """Whether a multi-lattice judgement sees lattices or only counts spots.

    A second lattice adds spots, so ranking hits by their detectable spots alone already
    separates multi from single lattices somewhat (`spot_count_auc`). `auc_at_fixed_spot_count`
    is the model's ROC AUC within MULTI_SPOT_STRATA strata of equal size by spot count, averaged
    with weights n_multi x n_single: near 0.5 for a model that knows nothing beyond the count
    (a little above, as the multi-lattice fraction still rises across each stratum).
    """
    p_multi, is_multi = np.asarray(p_multi, np.float64), np.asarray(is_multi, bool)
    order = np.argsort(np.asarray(n_detectable, np.float64), kind="stable")
    weighted, weights = 0.0, 0.0
    for stratum in np.array_split(order, MULTI_SPOT_STRATA):
        pairs = float(is_multi[stratum].sum()) * float((~is_multi[stratum]).sum())
        if pairs:
            weighted += pairs * roc_auc(p_multi[stratum], is_multi[stratum])
            weights += pairs
    return {
        "spot_count_auc": roc_auc(n_detectable, is_multi),
        "auc_at_fixed_spot_count": weighted / weights if weights else float("nan"),
    }


def summary(metrics: dict) -> dict:
    """The handful of numbers logged per epoch and quoted in model cards."""
    return {
        "r_inv_d": metrics["resolution"]["pearson_r_inv_d"],
        "med_rel_d": metrics["resolution"]["median_rel_err_d"],
        "multi_acc": metrics["multi_lattice"]["accuracy"],
        "multi_auc": metrics["multi_lattice"]["roc_auc"],
        "hit_acc": metrics["hit"]["accuracy"],
    }


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else float("nan")


# ---------------------------------------------------------------- running a model over a labelled set


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error (ValueError)."""
    name = str(name).lower()  # PHIL gives `auto` as libtbx.Auto
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={name} requested but no CUDA device {device.index or 0} is available")
    return device


def batch_to(x: torch.Tensor, device, memory_format=torch.channels_last) -> torch.Tensor:
    """A batch as float32 on `device`; image batches in `memory_format` (by default channels-last,
    oneDNN's and cuDNN's fast layout)."""
    x = x.to(device, non_blocking=True).float()
    return x.contiguous(memory_format=memory_format) if x.ndim == 4 else x


@torch.no_grad()
def run_model(model, loader, device, memory_format=torch.channels_last) -> tuple[dict, dict]:
    """(outputs, labels): the model's outputs (CPU float32) and the batches' labels over a loader of
    (x, labels) batches (image batches in `memory_format`), each concatenated in loader order."""
    model.eval()
    outputs, labels = [], []
    for x, batch_labels in loader:
        labels.append(batch_labels)
        x = batch_to(x, device, memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x)
        outputs.append({k: v.float().cpu() for k, v in out.items()})
    return _concatenate(outputs), _concatenate(labels)


def _concatenate(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]} if batches else {}


def crystal_predictions(outputs: dict) -> dict:
    """CrystalNet outputs -> numpy predictions (s_min, p_multi, p_hit)."""
    return {
        "s_min": outputs["s_min"].numpy(),
        "p_multi": torch.sigmoid(outputs["multi_logit"]).numpy(),
        "p_hit": torch.sigmoid(outputs["hit_logit"]).numpy(),
    }


def evaluate_crystal(model, dataset, device, batch_size=64, workers=0) -> tuple[dict, dict]:
    """(metrics, predictions) of a CrystalNet on a ShardDataset."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    predictions = crystal_predictions(run_model(model, loader, device)[0])
    return crystal_metrics(predictions, dataset.labels), predictions


# ---------------------------------------------------------------- the DIALS baseline


def dials_stats_per_image(experiment, reflections):
    """DIALS's per-image spot statistics (`per_image_analysis.stats_per_image`) of one experiment's
    reflections, which it may change.

    A still's spots are all on its one image, but dials.find_spots gives the spots of a still at
    frame k of a multi-image file (NeXus) z = k + 0.5, and stats_per_image counts a scan-less
    experiment's spots on frame 0 only: they are moved there first.
    """
    from dials.algorithms.spot_finding import per_image_analysis
    from dials.array_family import flex

    if experiment.scan is None and len(reflections):
        x, y, z = reflections["xyzobs.px.value"].parts()
        reflections["xyzobs.px.value"] = flex.vec3_double(x, y, z - flex.floor(z))
    return per_image_analysis.stats_per_image(experiment, reflections, resolution_analysis=True)


def dials_baseline(experiments_path, reflections_path=None, find_spots_args=()) -> list[dict]:
    """Per-image DIALS judgement, as users get it today: spot count and `estimated_d_min`
    from `dials.algorithms.spot_finding.per_image_analysis`.

    Runs `dials.find_spots` (in a temporary directory) when no reflections are given.
    Returns one dict per image, in `images.iter_image_refs` order: experiment,
    path, index, n_spots (all strong spots), n_spots_no_ice, estimated_d_min
    (Angstrom; NaN where DIALS gives none, i.e. at most 10 spots away from ice rings).
    """
    from dials.array_family import flex
    from dxtbx.model import ExperimentList

    from dials_diffnet.images import iter_image_refs

    experiments = ExperimentList.from_file(str(experiments_path), check_format=False)
    with tempfile.TemporaryDirectory(prefix="diffnet_dials_") as tmp:
        if reflections_path is None:
            reflections_path = pathlib.Path(tmp) / "strong.refl"
            command = [shutil.which("dials.find_spots") or "dials.find_spots", str(pathlib.Path(experiments_path).resolve()),
                       f"output.reflections={reflections_path}", "output.shoeboxes=False",
                       # an explicit nproc: DIALS 3.12's nproc=Auto fails on some still imports
                       f"nproc={len(os.sched_getaffinity(0))}", *find_spots_args]
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"dials.find_spots failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        reflections = flex.reflection_table.from_file(str(reflections_path))

    refs_by_experiment: dict[int, list] = {}
    for ref in iter_image_refs(experiments):
        refs_by_experiment.setdefault(ref.experiment_index, []).append(ref)
    records = []
    for i_expt, experiment in enumerate(experiments):
        selected = reflections.select(reflections["id"] == i_expt)
        # mapping to reciprocal space only touches reflections whose id indexes the list given
        selected["id"] = flex.int(len(selected), 0)
        selected.clean_experiment_identifiers_map()
        selected.centroid_px_to_mm(ExperimentList([experiment]))
        selected.map_centroids_to_reciprocal_space(ExperimentList([experiment]))
        stats = dials_stats_per_image(experiment, selected)
        for ref, n_total, n_no_ice, d_min in zip(
            refs_by_experiment.get(i_expt, []), stats.n_spots_total, stats.n_spots_no_ice, stats.estimated_d_min
        ):
            records.append({
                "experiment": i_expt,
                "identifier": ref.identifier,
                "path": ref.path,
                "index": ref.index,
                "n_spots": int(n_total),
                "n_spots_no_ice": int(n_no_ice),
                "estimated_d_min": float(d_min) if d_min > 0 else float("nan"),
            })
    return records


def compare_with_dials(d_true, is_hit, model_d_min, model_p_hit, dials_records, edge_limited=None) -> dict:
    """Model against DIALS on the same images (arrays aligned with `dials_records`).

    Resolution: over true hits that are not edge-limited, for each method on the
    images where it gave an estimate, and for both on the images where both did.
    Hit finding: model P(hit) >= 0.5 against DIALS n_spots >= 10.
    """
    d_true, is_hit = np.asarray(d_true, np.float64), np.asarray(is_hit, bool)
    model_d = np.asarray(model_d_min, np.float64)
    dials_d = np.array([r["estimated_d_min"] for r in dials_records], np.float64)
    dials_spots = np.array([r["n_spots"] for r in dials_records])
    usable = is_hit.copy()
    if edge_limited is not None:
        usable &= ~np.asarray(edge_limited, bool)
    model_ok, dials_ok = usable & np.isfinite(model_d), usable & np.isfinite(dials_d)
    both = model_ok & dials_ok

    def resolution(d_pred, sel):
        return dict(resolution_metrics(1 / d_pred[sel], 1 / d_true[sel]), fraction_estimated=_ratio(sel.sum(), usable.sum()))

    return {
        "n_images": len(d_true),
        "resolution": {
            "model": resolution(model_d, model_ok),
            "dials": resolution(dials_d, dials_ok),
            "model_on_common": resolution(model_d, both),
            "dials_on_common": resolution(dials_d, both),
        },
        "hit": {
            "model": binary_metrics(model_p_hit, is_hit),
            "dials": binary_metrics(dials_spots, is_hit, threshold=DIALS_MIN_SPOTS_FOR_HIT),
        },
    }


def evaluate_records(records_path, with_dials=False) -> tuple[dict, list[dict]]:
    """Predictions in a diffnet.json against the labels the simulator wrote next to each image
    (`shot_NNNNN.json`), and, with `with_dials`, DIALS's own per-image judgement of the same images
    (from the reflections diffnet.predict was given, else a fresh dials.find_spots).

    Returns (metrics, per-image rows).
    """
    from dials_diffnet.results import read_json
    from dials_diffnet.simulate.dataset import read_image_labels

    document, records = read_json(records_path)
    rows = []
    for r in records:
        label_file = pathlib.Path(r.path).with_suffix(".json")
        if not label_file.is_file():
            raise ValueError(f"no simulation labels next to {r.path} (expected {label_file.name})")
        labels = read_image_labels(r.path, r.image_number)["labels"]
        rows.append({"key": r.key, "path": r.path, "image_number": r.image_number, "ok": r.ok, "d_min": r.d_min, "p_hit": r.p_hit, "p_multi": r.p_multi, **{f"label_{k}": v for k, v in labels.items()}})
    ok = np.array([row["ok"] for row in rows], bool)
    if not ok.any():
        raise ValueError(f"no successfully judged image in {records_path}")
    good = [row for row in rows if row["ok"]]

    def column(key, dtype=np.float64):
        return np.array([row[key] for row in good], dtype)

    predictions = {"s_min": 1.0 / column("d_min"), "p_multi": column("p_multi"), "p_hit": column("p_hit")}
    labels = {
        "s_min": column("label_s_min"), "is_hit": column("label_is_hit", bool), "edge_limited": column("label_edge_limited", bool),
        "is_multi": column("label_is_multi", bool),
    }
    metrics = {"n_failed": int((~ok).sum()), **crystal_metrics(predictions, labels, summary_only=True)}
    if with_dials:
        # the strong spots diffnet.predict was given, if any: DIALS judged from the same spot finding
        inputs = document["inputs"]
        by_image = {(rec["identifier"], rec["path"], rec["index"]): rec
                    for rec in dials_baseline(inputs["experiments"], inputs.get("reflections"))}
        dials_rows = [by_image[row["key"]] for row in good]
        for row, rec in zip(good, dials_rows):
            row["dials_d_min"], row["dials_n_spots"] = rec["estimated_d_min"], rec["n_spots"]
        metrics["against_dials"] = compare_with_dials(
            column("label_d_min"), labels["is_hit"], column("d_min"), predictions["p_hit"], dials_rows, labels["edge_limited"]
        )
    return metrics, rows


def format_records_table(rows) -> str:
    from dials.util import tabulate

    def f(v, spec=".2f"):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)

    table = [
        [pathlib.Path(r["path"]).name, r["image_number"], f(r["label_d_min"]), f(r["d_min"]), f(r.get("dials_d_min")),
         "yes" if r["label_is_hit"] else "no", f(r["p_hit"]), "yes" if r["label_is_multi"] else "no", f(r["p_multi"])]
        for r in rows
    ]
    headers = ["file", "image", "d_min label", "d_min model", "d_min DIALS", "hit label", "P(hit)", "multi label", "P(multi)"]
    return tabulate(table, headers=headers)


# ---------------------------------------------------------------- output


def write_json(path, obj):
    """Write JSON atomically (NaN written as null, which is valid JSON)."""
    path = pathlib.Path(path)
    text = json.dumps(json_safe(obj), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(obj):
    """obj with NaN/inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _bin_label(b: dict) -> str:
    """"lo-hi", or "lo+" for an open bin: hi is inf, or None once json_safe has been through (model cards)."""
    return f"{b['lo']:g}+" if b["hi"] is None or not np.isfinite(b["hi"]) else f"{b['lo']:g}-{b['hi']:g}"


def format_tables(metrics: dict) -> str:
    """The printed summary of `crystal_metrics`."""
    from dials.util import tabulate

    def f(v, spec=".3f"):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)

    res, edge = metrics["resolution"], metrics["resolution_edge_limited"]
    rows = [
        ["resolution (hits, not edge-limited)", "n", f(res["n"], "d")],
        ["", "Pearson r (1/d)", f(res["pearson_r_inv_d"], ".4f")],
        ["", "Pearson r (d)", f(res["pearson_r_d"], ".4f")],
        ["", "MAE (A)", f(res["mae_d"])],
        ["", "MAE (1/A)", f(res["mae_inv_d"], ".4f")],
        ["", "median |dd|/d", f(res["median_rel_err_d"], ".4f")],
        ["", "within 10% of d", f(res["fraction_within_10pct"])],
        ["resolution (edge-limited)", "n", f(edge["n"], "d")],
        ["", "at least as good (10%)", f(edge["fraction_at_least_as_good"])],
    ]
    for name, title in (("multi_lattice", "multi-lattice (hits)"), ("hit", "hit vs non-hit (all)"),
                        ("hit_vs_empty", "hit vs no crystal")):
        if name not in metrics:
            continue
        m = metrics[name]
        c = m["confusion"]
        rows += [
            [title, "n (positive)", f"{m['n']} ({m['n_positive']})"],
            ["", "accuracy", f(m["accuracy"], ".4f")],
            ["", "balanced accuracy", f(m["balanced_accuracy"], ".4f")],
            ["", "precision / recall", f"{f(m['precision'])} / {f(m['recall'])}"],
            ["", "ROC AUC", f(m["roc_auc"], ".4f")],
            ["", "confusion tp fp fn tn", f"{c['tp']} {c['fp']} {c['fn']} {c['tn']}"],
        ]
    multi = metrics["multi_lattice"]
    if "spot_count_auc" in multi:
        rows += [["multi-lattice, spot-count control", "AUC of the spot count alone", f(multi["spot_count_auc"], ".4f")],
                 ["", "model AUC at fixed spot count", f(multi["auc_at_fixed_spot_count"], ".4f")]]
    near = metrics.get("hit_near_misses")
    if near:
        rows.append(["crystal, too few spots for a hit", "n / called hit", f"{near['n']} / {f(near['fraction_called_hit'])}"])
    text = tabulate(rows, headers=["metric", "", "value"])
    if metrics.get("hit_called_by_detectable_spots"):
        text += "\n\nShots with a crystal called hits, by detectable spots (a hit has >= 10)\n" + tabulate(
            [[_bin_label(b), b["n"], f(b["fraction_called_hit"])] for b in metrics["hit_called_by_detectable_spots"]],
            headers=["detectable spots", "n", "called hit"],
        )
    if metrics.get("resolution_by_detectable_spots"):
        text += "\n\nResolution of hits (not edge-limited) by detectable spots\n" + tabulate(
            [[_bin_label(b), b["n"], f(b["pearson_r_inv_d"], ".4f"), f(b["median_rel_err_d"], ".4f"), f(b["fraction_within_10pct"])]
             for b in metrics["resolution_by_detectable_spots"]],
            headers=["detectable spots", "n", "Pearson r (1/d)", "median |dd|/d", "within 10% of d"],
        )
    if metrics.get("hit_operating_points"):
        text += "\n\nWhat diffnet.filter min_p_hit keeps (empty: no crystal; near miss: a crystal with < 10 spots)\n" + tabulate(
            [[b["min_p_hit"], f(b["hits_kept"]), f(b["empty_kept"]), f(b["near_misses_kept"]),
              f(b["hit_vs_empty_accuracy"], ".4f"), f(b["hit_accuracy"], ".4f")] for b in metrics["hit_operating_points"]],
            headers=["min_p_hit", "hits kept", "empty kept", "near misses kept", "hit vs empty acc", "hit vs non-hit acc"],
        )
    for key, title in (("accuracy_by_misorientation_deg", "misorientation (deg)"), ("accuracy_by_minority_share", "minority share")):
        bins = multi.get(key)
        if bins:
            text += "\n\nMulti-lattice recall by " + title + "\n" + tabulate(
                [[_bin_label(b), b["n"], f(b["accuracy"])] for b in bins], headers=[title, "n", "accuracy"]
            )
    return text
