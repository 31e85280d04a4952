"""Labelled data sets from the stills simulator, in two forms:

- tensor shards for training: `shard_NNNNN.npz` holding `represent()` outputs
  (float16) and label arrays, plus `index.json` (recipe, seeds, label definitions);
- image files for DIALS: `shot_NNNNN.cbf` + `shot_NNNNN.json` (all parameters, seed, labels).

Shot i of a data set with seed S is generated from seed S * 1_000_000 + i; its
geometry from group i // images_per_geometry. Either form regenerates any image.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import time

import numpy as np

from dials_diffnet import datasets
from dials_diffnet.datasets import LABELS
from dials_diffnet.datasets import write_shard as save_shard_arrays
from dials_diffnet.representation import CRYSTAL_GRID, N_CHANNELS, represent
from dials_diffnet.simulate.detectors import pilatus_model, to_dxtbx, writes_integers
from dials_diffnet.simulate.stills import LABEL_DEFINITIONS, DetectorFrame, Recipe, render, sample_geometry, sample_shot

SEED_STRIDE = 1_000_000


def shot_seed(dataset_seed: int, i: int) -> int:
    return dataset_seed * SEED_STRIDE + i


def geometry_for(dataset_seed: int, group: int, recipe: Recipe) -> dict:
    return sample_geometry(np.random.default_rng([dataset_seed, group, 7]), recipe)


def iter_shots(dataset_seed: int, indices, recipe: Recipe, noise=True):
    """(index, ShotParams, SimulatedImage) for the given shot indices, reusing each geometry's frame."""
    frame, frame_group = None, None
    for i in indices:
        group = i // recipe.images_per_geometry
        geometry = geometry_for(dataset_seed, group, recipe)
        if group != frame_group:
            frame, frame_group = DetectorFrame(**geometry), group
        shot = sample_shot(shot_seed(dataset_seed, i), recipe, geometry)
        yield i, shot, render(shot, frame, noise=noise)


def write_index(out_dir, dataset_seed, n_images, recipe, shard_size, extra=None, planes=N_CHANNELS):
    shards = [f"shard_{k:05d}.npz" for k in range(-(-n_images // shard_size))] if shard_size else []
    return datasets.write_index(out_dir, shards, n_images, dataclasses.asdict(recipe), (CRYSTAL_GRID.size, CRYSTAL_GRID.s_max),
                                planes, seed=dataset_seed, shard_size=shard_size, label_definitions=LABEL_DEFINITIONS,
                                **(extra or {}))


def write_shard(out_dir, dataset_seed, shard_index, n_images, recipe, shard_size, planes=N_CHANNELS):
    """Simulate and store one shard (skipped if already there: generation can resume)."""
    path = pathlib.Path(out_dir) / f"shard_{shard_index:05d}.npz"
    if path.exists():
        return path
    indices = range(shard_index * shard_size, min((shard_index + 1) * shard_size, n_images))
    xs, labels = [], {k: [] for k in LABELS}
    for i, shot, image in iter_shots(dataset_seed, indices, recipe):
        xs.append(represent(image.pixels, image.valid, image.frame.grid_map, planes).astype(np.float16))
        row = {**image.labels, "detector": shot.detector, "seed": shot.seed}
        for k in LABELS:
            labels[k].append(row[k])
    save_shard_arrays(path, np.stack(xs), labels)
    return path


def check_resumable(out_dir, planes=N_CHANNELS):
    """ValueError if out_dir already holds shards of another number of planes: resuming would mix
    shards of two representations in one dataset."""
    existing = pathlib.Path(out_dir) / "index.json"
    if existing.is_file() and json.loads(existing.read_text()).get("planes", N_CHANNELS) != planes:
        raise ValueError(f"{out_dir} holds shards of another number of planes; use a new output.directory")


def generate_shards(out_dir, dataset_seed, n_images, recipe, shard_size=256, worker=0, n_workers=1, log=print,
                    planes=N_CHANNELS):
    check_resumable(out_dir, planes)
    write_index(out_dir, dataset_seed, n_images, recipe, shard_size, planes=planes)
    n_shards = (n_images + shard_size - 1) // shard_size
    t0 = time.time()
    for k in range(worker, n_shards, n_workers):
        write_shard(out_dir, dataset_seed, k, n_images, recipe, shard_size, planes)
        log(f"shard {k + 1}/{n_shards} done ({time.time() - t0:.0f} s)")


IMAGE_FORMATS = ("cbf", "minicbf", "nexus")


def write_images(out_dir, dataset_seed, n_images, recipe, compress=True, start=0, image_format="cbf"):
    """Image files + JSON (params and labels), for DIALS and for format tests.

    cbf: shot_NNNNN.cbf + shot_NNNNN.json, one full CBF per shot (any detector).
    minicbf: the same as Pilatus miniCBF (single flat photon-counting panels only).
    nexus: shots_GGGGG.nxs + shots_GGGGG.json, one NXmx file per geometry group holding its
    shots in order, as an Eiger at an SSX beamline writes (single-panel detectors only);
    the JSON lists the shots' records under "shots".
    Returns the image files written.
    """
    from dials_diffnet.simulate.cbf import dxtbx_beam, write_cbf, write_minicbf  # pycbf: only when writing CBF

    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_index(out_dir, dataset_seed, n_images, recipe, shard_size=0, extra={"format": image_format, "first_index": start})
    shots = iter_shots(dataset_seed, range(start, start + n_images), recipe)
    if image_format == "nexus":
        groups = itertools.groupby(shots, key=lambda shot: shot[0] // recipe.images_per_geometry)
        return [_write_nexus_group(out_dir / f"shots_{group + 1:05d}", dataset_seed, members) for group, members in groups]
    paths = []
    for i, shot, image in shots:
        stem = out_dir / f"shot_{i + 1:05d}"  # frame numbers from 1, as DIALS counts them
        frame = image.frame
        detector = to_dxtbx(frame.model, frame.panels)
        beam = dxtbx_beam(shot.wavelength, polarization=shot.polarization)
        if image_format == "minicbf":
            model = pilatus_model(frame.model.name)
            if model is None:
                raise ValueError(f"{frame.model.name} cannot be written as a Pilatus miniCBF")
            write_minicbf(f"{stem}.cbf", detector, beam, image.pixels[0], model=model)
        else:
            write_cbf(f"{stem}.cbf", detector, beam, image.pixels, integer=writes_integers(frame.model), compress=compress)
        record = {"image": f"{stem.name}.cbf", **_shot_record(dataset_seed, i, shot, image)}
        datasets.atomic_write(f"{stem}.json", json.dumps(record, indent=1).encode())
        paths.append(f"{stem}.cbf")
    return paths


def _shot_record(dataset_seed, i, shot, image) -> dict:
    return {"seed": shot.seed, "dataset_seed": dataset_seed, "index": i, "params": shot.to_json(), "labels": image.labels}


def _write_nexus_group(stem, dataset_seed, members) -> str:
    """One geometry group's shots, an iterator of (index, ShotParams, SimulatedImage), as stem.nxs + stem.json."""
    from dials_diffnet.simulate.nexus import PIXEL_MASK_GAP, write_nexus  # h5py: only when writing NeXus

    first = next(members)
    frame = first[2].frame
    gaps = np.where(frame.sensitive.reshape(first[2].pixels[0].shape), 0, PIXEL_MASK_GAP)
    records = []

    def frames():
        for i, shot, image in itertools.chain([first], members):
            records.append({"image": f"{stem.name}.nxs", "image_number": len(records) + 1,
                            **_shot_record(dataset_seed, i, shot, image)})
            yield shot.wavelength, image.pixels[0]

    write_nexus(f"{stem}.nxs", to_dxtbx(frame.model, frame.panels), frames(), pixel_mask=gaps,
                integer=writes_integers(frame.model))
    datasets.atomic_write(f"{stem}.json", json.dumps({"shots": records}, indent=1).encode())
    return f"{stem}.nxs"


def read_image_labels(image_path, image_number=1) -> dict:
    """The simulator's record of one image: from shot_NNNNN.json beside a CBF, or the
    image_number-th (1-based) shot of the shots_GGGGG.json beside a NeXus file."""
    record = json.loads(pathlib.Path(image_path).with_suffix(".json").read_text())
    return record["shots"][image_number - 1] if "shots" in record else record
