"""The `spi` task for `diffnet.predict task=spi`: hit count, particle type, and few-shot labels.

    task = SpiTask()                                  # shipped spi_multi + spi_twin
    task = SpiTask(reference="support.cxi")           # + few-shot labels from a labelled support set
    records = task.predict_batch(x)                   # x: (B, 2, S, S) from represent(..., task.grid)

task.grid is the finest grid either network reads (SPI_GRID); a network trained on a
coarser grid gets the exactly coarsened input (models/grids.py), so each image is
read once.

A support set is a CXI file with a /entry_1/spi_labels group (its `label` dataset,
or else the particle count as "single"/"double"/"triple"/"quadruple"), or a
directory whose sub-directories name the classes and hold CXI files or images
dxtbx reads. Its patterns are embedded by the twin network once; each query
takes the label of the nearest class prototype. No retraining.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import torch
from dials.util import Sorry

from dials_diffnet.images import RawImage, iter_image_refs, read_image
from dials_diffnet.models.grids import Coarsened, coarsening_factor
from dials_diffnet.models.views import ViewAveraged
from dials_diffnet.representation import N_CHANNELS, GridSpec, cached_grid_map, represent
from dials_diffnet.spi import SPI_GRID
from dials_diffnet.spi.cxi import read_cxi, read_cxi_labels
from dials_diffnet.spi.fewshot import FewShotClassifier
from dials_diffnet.weights import shipped_path

logger = logging.getLogger("dials.diffnet.spi")

COUNT_NAMES = {1: "single", 2: "double", 3: "triple", 4: "quadruple"}


def represent_raw(raw: RawImage) -> np.ndarray:
    """Network input for any SPI image, dxtbx- or CXI-read."""
    return represent(raw.pixels, raw.valid, cached_grid_map(tuple(raw.panels), raw.beam, SPI_GRID))


def _cxi_support(path: pathlib.Path, label: str | None = None):
    xs = [represent_raw(raw) for raw in read_cxi(path)]
    if label is not None:
        return xs, [label] * len(xs)
    labels = read_cxi_labels(path)
    if labels is None:
        raise Sorry(f"reference {path} has no /entry_1/spi_labels group: cannot tell its classes")
    if "label" in labels:
        return xs, [str(v) for v in labels["label"]]
    return xs, [COUNT_NAMES[int(c)] for c in labels["count"]]


def _image_support(files, label):
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_filenames([str(f) for f in files])
    xs = [represent_raw(read_image(ref.imageset, ref.index)) for ref in iter_image_refs(experiments)]
    return xs, [label] * len(xs)


def load_reference(path) -> tuple[np.ndarray, list[str]]:
    """(inputs (N, 2, S, S), labels) of a support set; Sorry for anything unusable."""
    path = pathlib.Path(path)
    xs, labels = [], []
    try:
        if path.is_file():
            xs, labels = _cxi_support(path)
        elif path.is_dir():
            for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
                files = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.endswith(".json"))
                cxi_files = [f for f in files if f.suffix in (".cxi", ".h5")]
                for f in cxi_files:
                    x, lab = _cxi_support(f, class_dir.name)
                    xs, labels = xs + x, labels + lab
                others = [f for f in files if f not in cxi_files]
                if others:
                    x, lab = _image_support(others, class_dir.name)
                    xs, labels = xs + x, labels + lab
        else:
            raise Sorry(f"reference {path} does not exist")
    except Sorry:
        raise
    except Exception as e:
        raise Sorry(f"cannot read reference {path}: {e}") from None
    if len(set(labels)) < 2:
        raise Sorry(f"reference {path} must hold labelled patterns of at least two classes, found {sorted(set(labels))}")
    return np.stack(xs), labels


def _on_task_grid(model, card: dict, weights_path):
    """`model` taking represent()'s output on SPI_GRID, whatever grid of the same reach it was trained on."""
    try:
        factor = coarsening_factor(SPI_GRID, GridSpec(**card["grid"]))
    except ValueError as e:
        raise Sorry(f"{weights_path}: {e}") from None
    return Coarsened(model, factor) if factor > 1 else model


class SpiTask:
    name = "spi"
    grid = SPI_GRID
    planes = N_CHANNELS

    def __init__(self, reference=None, device="cpu", multi_path=None, twin_path=None, method="prototype",
                 views=8):
        self.device = torch.device(device)
        from dials_diffnet.inference import card_summary, load_task_model

        self.views, self.models, cards, nets = views, {}, {}, {}
        for name, path in (("spi_multi", multi_path), ("spi_twin", twin_path)):
            path = path or shipped_path(name)
            net, cards[name] = load_task_model(path, self.device)
            nets[name] = _on_task_grid(net, cards[name], path)
            self.models[name] = dict(card_summary(cards[name]), views=views, grid_size=cards[name]["grid"]["size"])
        self.multi, self.twin = ViewAveraged(nets["spi_multi"], views), nets["spi_twin"]
        self.particle_types = list(cards["spi_multi"]["particle_types"])
        self.reflection_columns = ["spi_count", "spi_p_single", "spi_type_prob"]
        self.has_hit_head = "hit_logits" in cards["spi_multi"]["outputs"]
        if self.has_hit_head:
            self.reflection_columns.append("p_hit")
        self.fewshot = None
        if reference is not None:
            x, labels = load_reference(reference)
            self.fewshot = FewShotClassifier(self.embed(torch.from_numpy(x)), labels, method)
            self.reflection_columns.append("spi_fewshot_distance")
            logger.info("few-shot reference %s: %d patterns, classes %s", reference, len(labels),
                        ", ".join(f"{c} ({labels.count(c)})" for c in self.fewshot.classes))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 64) -> np.ndarray:
        parts = [self.twin.embed(x[i : i + batch].float().to(self.device), self.views).cpu()
                 for i in range(0, len(x), batch)]
        return torch.cat(parts).numpy()

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> list[dict]:
        out = self.multi(x.float().to(self.device))
        count_p = torch.softmax(out["count_logits"], 1).cpu().numpy()
        type_p = torch.softmax(out["type_logits"], 1).cpu().numpy()
        hit_p = torch.sigmoid(out["hit_logits"]).cpu().numpy() if self.has_hit_head else [None] * len(count_p)
        records = []
        for cp, tp, hp in zip(count_p, type_p, hit_p):
            t = int(tp.argmax())
            records.append({
                "p_hit": None if hp is None else float(hp),
                "spi_count": int(cp.argmax()) + 1,
                "spi_p_single": float(cp[0]),
                "spi_count_probs": [float(v) for v in cp],
                "spi_type": self.particle_types[t],
                "spi_type_prob": float(tp[t]),
            })
        if self.fewshot is not None:
            labels, distances = self.fewshot.predict(self.embed(x))
            for r, label, d in zip(records, labels, distances):
                r["spi_fewshot_label"], r["spi_fewshot_distance"] = label, float(d)
        return records
