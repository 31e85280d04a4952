"""Labelled SPI data sets: simulate detector images, pass them through `represent`, keep the tensors.

A set is a list of shot specs (seed, particle, count, noise, pool); the tensors
are cached as .npz so training, the sweep and evaluation share one simulation.
Seed ranges are disjoint by construction (`SEED_BASES`), and every row can be
regenerated with `simulate.shot_params(*spec)`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pathlib
import time
import zipfile
from dataclasses import dataclass
from functools import partial

import numpy as np

from dials_diffnet.representation import GridSpec
from dials_diffnet.spi import SPI_GRID
from dials_diffnet.spi.particles import SEEN_TYPES, UNSEEN_TYPES, bead_model, random_shape_names
from dials_diffnet.spi.simulate import BLANK, MAX_COUNT, particle_transform, represent_shot, shot_params, simulate

logger = logging.getLogger("dials.diffnet.spi.dataset")

# Disjoint seed ranges: a training seed can never reappear in a test set.
SEED_BASES = {"train": 1_000_000, "test": 2_000_000, "unseen": 3_000_000, "check": 4_000_000, "validation": 5_000_000,
              "random": 6_000_000}


@dataclass(frozen=True)
class ShotSpec:
    seed: int
    particle: str
    count: int
    noise: str
    pool: str


def balanced_specs(split: str, particles, per_class: int, noises=("clean", "noisy"), pool=None, offset=0,
                   counts=tuple(range(1, MAX_COUNT + 1))):
    """per_class shots for every (particle, count, noise), seeds counted up from the split's base."""
    pool = pool or ("train" if split == "train" else "test")
    seed = SEED_BASES[split] + offset
    specs = []
    for i in range(per_class):
        for noise in noises:
            for particle in particles:
                for count in counts:
                    specs.append(ShotSpec(seed, particle, count, noise, pool))
                    seed += 1
    return specs


def blank_specs(split: str, n: int, pool=None) -> list:
    """n noisy blank shots (count 0; readout noise drawn per frame, simulate.BLANK_READOUT_RANGE), seeds
    counted up from the split's base + BLANK_OFFSET. A noise-free blank is an all-zero frame, which
    diffnet.predict flags as a failure before any network sees it."""
    pool = pool or ("train" if split == "train" else "test")
    return [ShotSpec(SEED_BASES[split] + BLANK_OFFSET + i, BLANK, 0, "noisy", pool) for i in range(n)]


def _tensor(spec: ShotSpec, grid: GridSpec) -> np.ndarray:
    shot = simulate(shot_params(spec.seed, spec.particle, spec.count, spec.noise, spec.pool), grid=grid)
    return represent_shot(shot, grid).astype(np.float16)


def _init_worker():
    import torch

    torch.set_num_threads(1)


LABEL_KEYS = ("count", "particle", "noise", "pool", "seed")


def _leading_rows(path, key: str, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """The first n rows of array `key` of an uncompressed .npz, read into `out` (or a new array)
    without loading the rest, so slicing or extending a cache of many GB holds one copy of it."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = header(stream)
        if fortran_order or n > shape[0]:
            raise ValueError(f"{path}: {key} does not hold {n} C-ordered rows")
        out = np.empty((n, *shape[1:]), dtype) if out is None else out
        buffer, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < len(buffer):
            got = stream.readinto(buffer[done : done + (1 << 26)])
            if not got:
                raise ValueError(f"{path}: {key} ends early")
            done += got
    return out


def build(specs, cache: pathlib.Path | None = None, workers: int = 1, grid: GridSpec = SPI_GRID) -> dict:
    """{'x': (N, 2, S, S) float16 on `grid`, 'count', 'particle', 'noise', 'pool', 'seed'} for the specs,
    cached at `cache`. A cache that starts with the same specs is reused: a longer one is sliced (not
    overwritten), a shorter one is extended (only the specs after it are simulated)."""
    n_cached = 0
    if cache is not None and pathlib.Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as stored:
            seeds = stored["seed"]
        n = min(len(seeds), len(specs))
        if _leading_rows(cache, "x", 0).shape[-1] == grid.size and np.array_equal(seeds[:n], [s.seed for s in specs[:n]]):
            n_cached = n
    if n_cached and n_cached == len(specs):
        return {key: _leading_rows(cache, key, n_cached) for key in ("x", *LABEL_KEYS)}
    todo = specs[n_cached:]
    start = time.time()
    for name in sorted({s.particle for s in todo} - {BLANK}):
        particle_transform(name)  # built once here, shared by the forked workers
    tensor = partial(_tensor, grid=grid)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker))
            rows = pool.imap(tensor, todo, chunksize=16)
        else:
            rows = map(tensor, todo)
        x = None
        for i, row in enumerate(rows):
            if x is None:  # every row lands in place: no list of rows, no second copy of the cache
                x = np.empty((len(specs), *row.shape), np.float16)
                if n_cached:
                    _leading_rows(cache, "x", n_cached, out=x[:n_cached])
            x[n_cached + i] = row
    logger.info("simulated and represented %d shots in %.0f s (%d workers)", len(todo), time.time() - start, workers)
    data = {"x": x, "count": np.array([s.count for s in specs], np.int64), "particle": np.array([s.particle for s in specs]),
            "noise": np.array([s.noise for s in specs]), "pool": np.array([s.pool for s in specs]),
            "seed": np.array([s.seed for s in specs], np.int64)}
    if cache is not None:
        pathlib.Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(str(cache) + ".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, cache)
    return data


# Seeds of the crowded and close sets start this far into the training range, beyond any train_per_class
# (7 812 would reach the first) and beyond each other.
CROWDED_OFFSET = 500_000
CLOSE_OFFSET = 700_000
CLOSE_BELOW = 0.5  # diameters: where the count is wrong most (docs/spi.md, Results)
# The compact set: 3 and 4 particles with a pair < 0.7 diameters apart in projection, where 10 of
# spi_multi 0.13.0's 12 validation errors lay (docs/history/spi-training.md, session 23).
COMPACT_OFFSET = 800_000
# Blank shots (no particle: the detector's noise only) start this far into each split's seed range.
BLANK_OFFSET = 900_000
COMPACT_BELOW = 0.7


def row_spec(data: dict, row: int) -> ShotSpec:
    """The spec of one row of a built set (its labels regenerate the shot)."""
    return ShotSpec(int(data["seed"][row]), str(data["particle"][row]), int(data["count"][row]),
                    str(data["noise"][row]), str(data["pool"][row]))


def smallest_projected_separation(spec: ShotSpec) -> float:
    """Closest pair of particle centres seen along the beam, in particle diameters (inf for one particle):
    two particles less than a diameter apart in projection overlap on the detector's view."""
    params = shot_params(spec.seed, spec.particle, spec.count, spec.noise, spec.pool)
    xy = params.offsets[:, :2]  # the beam runs along z
    gaps = [np.linalg.norm(xy[i] - xy[j]) for i in range(len(xy)) for j in range(i + 1, len(xy))]
    return min(gaps) / (2 * bead_model(params.particle).radius) if gaps else np.inf


def close_specs(per_class: int, below: float = CLOSE_BELOW, counts=(2, 3, 4), offset: int = CLOSE_OFFSET) -> list:
    """per_class training shots for every (seen type, count in `counts`, noise) whose closest pair of particles
    is less than `below` diameters apart in projection: seeds counted up from the training range's base +
    `offset`, those that draw a wider cluster skipped (drawing the parameters costs nothing, simulating them does)."""
    specs, seed = [], SEED_BASES["train"] + offset
    for noise in ("clean", "noisy"):
        for particle in SEEN_TYPES:
            for count in counts:
                kept = 0
                while kept < per_class:
                    spec = ShotSpec(seed, particle, count, noise, "train")
                    if smallest_projected_separation(spec) < below:
                        specs.append(spec)
                        kept += 1
                    seed += 1
    return specs


def standard_sets(scale: float = 1.0, random_shapes: int = 0, train_per_class: int = 75, crowded_per_class: int = 0,
                  close_per_class: int = 0, compact_per_class: int = 0, train_from: int = 0) -> dict:
    """The sets the shipped models were trained and evaluated on (`scale` shrinks them for quick runs).

    train:  seen types x counts 1-4 x {clean, noisy} x train_per_class, training geometry pool (a larger
            set starts with a smaller one's shots: seeds run over the classes, then the repeats); with
            train_from, only the repeats from that one on (shots a model trained on the first ones never saw)
    random: (when random_shapes > 0) that many procedural particles x counts x {clean, noisy} x 5,
            training geometry pool: extra training data for the count, no particle type
    crowded: (when crowded_per_class > 0) seen types x counts 3-4 x {clean, noisy} x crowded_per_class,
            training geometry pool: more of the shots the count gets wrong most (3 vs 4 particles)
    close:  (when close_per_class > 0) seen types x counts 2-4 x {clean, noisy} x close_per_class, training
            geometry pool, only clusters with two particles < 0.5 diameters apart in projection (close_specs)
    compact: (when compact_per_class > 0) seen types x counts 3-4 x {clean, noisy} x compact_per_class, as close
            but with a pair < 0.7 diameters apart, on seeds of its own
    test:   the same classes as train, disjoint seeds, the test geometry pool (unseen geometries)
    unseen: the held-back particle types, for the twin network's few-shot test
    """
    def n(k):
        return max(1, int(round(k * scale)))

    skip = n(train_from) if train_from else 0
    if skip >= n(train_per_class):
        raise ValueError(f"train_from {train_from} leaves no training shots of {train_per_class} per class")
    train = balanced_specs("train", SEEN_TYPES, n(train_per_class))
    sets = {
        "train": train[skip * len(train) // n(train_per_class):],  # each repeat holds one shot of every class
        "test": balanced_specs("test", SEEN_TYPES, n(20)),
        "unseen": balanced_specs("unseen", UNSEEN_TYPES, n(30)),
    }
    if crowded_per_class:
        sets["crowded"] = balanced_specs("train", SEEN_TYPES, n(crowded_per_class), offset=CROWDED_OFFSET, counts=(3, 4))
    if close_per_class:
        sets["close"] = close_specs(n(close_per_class))
    if compact_per_class:
        sets["compact"] = close_specs(n(compact_per_class), COMPACT_BELOW, (3, 4), COMPACT_OFFSET)
    if random_shapes:
        # a seed block per shape, so the first k shapes' patterns do not depend on how many are asked for
        per_shape = n(5)
        block = per_shape * 2 * MAX_COUNT
        sets["random"] = [spec for k, name in enumerate(random_shape_names(random_shapes))
                          for spec in balanced_specs("random", [name], per_shape, pool="train", offset=k * block)]
    return sets


class StackedRows:
    """The rows of several arrays read as one array (by row, slice or index array), without the copy
    np.concatenate would make: a training set of 10 GB and its extension then fit in memory once."""

    def __init__(self, *parts: np.ndarray):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype, self.ndim = parts[0].dtype, parts[0].ndim

    def __len__(self):
        return self.shape[0]

    def _row(self, i: int) -> np.ndarray:
        i = int(i) + len(self) if i < 0 else int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k][i - self.starts[k]]

    def __getitem__(self, index):
        if np.ndim(index) == 0 and not isinstance(index, slice):
            return self._row(index)
        rows = np.arange(len(self))[index]
        return np.stack([self._row(i) for i in rows]) if len(rows) else np.empty((0, *self.shape[1:]), self.dtype)


def joined(*sets: dict) -> dict:
    """One set holding the patterns of several (e.g. train and random); the patterns are not copied."""
    return {k: StackedRows(*(s[k] for s in sets)) if k == "x" else np.concatenate([s[k] for s in sets]) for k in sets[0]}


def validation_sets(scale: float = 1.0) -> dict:
    """Where candidate models are compared (never on `standard_sets` test or unseen): the same
    classes as train/test and the held-back types, seeds of their own, training geometry pool."""
    per_class = max(6, int(round(10 * scale)))  # few-shot scoring draws 5 support patterns per class, plus queries
    return {
        "test": balanced_specs("validation", SEEN_TYPES, per_class, pool="train"),
        "unseen": balanced_specs("validation", UNSEEN_TYPES, per_class, pool="train", offset=100_000),
    }
