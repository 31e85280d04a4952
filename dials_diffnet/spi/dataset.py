"""Labelled SPI data sets: simulate detector images, pass them through `represent`, keep the tensors.

A set is a list of shot specs (seed, particle, count, noise, pool); the tensors
are cached as .npz so training, the sweep and evaluation share one simulation.
Seed ranges are disjoint by construction (`SEED_BASES`), and every row can be
regenerated with `simulate.shot_params(*spec)`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pathlib
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from dials_diffnet.representation import GridSpec
from dials_diffnet.spi import SPI_GRID
from dials_diffnet.spi.simulate import MAX_COUNT, particle_transform, represent_shot, shot_params, simulate

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


def balanced_specs(split: str, particles, per_class: int, noises=("clean", "noisy"), pool=None, offset=0):
    """per_class shots for every (particle, count, noise), seeds counted up from the split's base."""
    pool = pool or ("train" if split == "train" else "test")
    seed = SEED_BASES[split] + offset
    specs = []
    for i in range(per_class):
        for noise in noises:
            for particle in particles:
                for count in range(1, MAX_COUNT + 1):
                    specs.append(ShotSpec(seed, particle, count, noise, pool))
                    seed += 1
    return specs


def _tensor(spec: ShotSpec, grid: GridSpec) -> np.ndarray:
    shot = simulate(shot_params(spec.seed, spec.particle, spec.count, spec.noise, spec.pool), grid=grid)
    return represent_shot(shot, grid).astype(np.float16)


def _init_worker():
    import torch

    torch.set_num_threads(1)


def build(specs, cache: pathlib.Path | None = None, workers: int = 1, grid: GridSpec = SPI_GRID) -> dict:
    """{'x': (N, 2, S, S) float16 on `grid`, 'count', 'particle', 'noise', 'seed'} for the specs, cached at
    `cache`. A cache that starts with the same specs is reused: a longer one is sliced (not overwritten),
    a shorter one is extended (only the specs after it are simulated)."""
    cached = None
    if cache is not None and pathlib.Path(cache).is_file():
        data = dict(np.load(cache, allow_pickle=False))
        n = min(len(data["seed"]), len(specs))
        if data["x"].shape[-1] == grid.size and np.array_equal(data["seed"][:n], [s.seed for s in specs[:n]]):
            if n == len(specs):
                return {k: v[:n] for k, v in data.items()}
            cached = data
    todo = specs[len(cached["seed"]):] if cached is not None else specs
    start = time.time()
    for name in sorted({s.particle for s in todo}):
        particle_transform(name)  # built once here, shared by the forked workers
    tensor = partial(_tensor, grid=grid)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            xs = pool.map(tensor, todo, chunksize=16)
    else:
        xs = [tensor(s) for s in todo]
    logger.info("simulated and represented %d shots in %.0f s (%d workers)", len(todo), time.time() - start, workers)
    data = {
        "x": np.stack(xs),
        "count": np.array([s.count for s in todo], np.int64),
        "particle": np.array([s.particle for s in todo]),
        "noise": np.array([s.noise for s in todo]),
        "pool": np.array([s.pool for s in todo]),
        "seed": np.array([s.seed for s in todo], np.int64),
    }
    if cached is not None:
        data = joined(cached, data)
    if cache is not None:
        pathlib.Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(str(cache) + ".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, cache)
    return data


def standard_sets(scale: float = 1.0, random_shapes: int = 0, train_per_class: int = 75) -> dict:
    """The sets the shipped models were trained and evaluated on (`scale` shrinks them for quick runs).

    train:  seen types x counts 1-4 x {clean, noisy} x train_per_class, training geometry pool (a larger
            set starts with a smaller one's shots: seeds run over the classes, then the repeats)
    random: (when random_shapes > 0) that many procedural particles x counts x {clean, noisy} x 5,
            training geometry pool: extra training data for the count, no particle type
    test:   the same classes as train, disjoint seeds, the test geometry pool (unseen geometries)
    unseen: the held-back particle types, for the twin network's few-shot test
    """
    from dials_diffnet.spi.particles import SEEN_TYPES, UNSEEN_TYPES, random_shape_names

    def n(k):
        return max(1, int(round(k * scale)))

    sets = {
        "train": balanced_specs("train", SEEN_TYPES, n(train_per_class)),
        "test": balanced_specs("test", SEEN_TYPES, n(20)),
        "unseen": balanced_specs("unseen", UNSEEN_TYPES, n(30)),
    }
    if random_shapes:
        # a seed block per shape, so the first k shapes' patterns do not depend on how many are asked for
        per_shape = n(5)
        block = per_shape * 2 * MAX_COUNT
        sets["random"] = [spec for k, name in enumerate(random_shape_names(random_shapes))
                          for spec in balanced_specs("random", [name], per_shape, pool="train", offset=k * block)]
    return sets


def joined(*sets: dict) -> dict:
    """One set holding the patterns of several (e.g. train and random)."""
    return {k: np.concatenate([s[k] for s in sets]) for k in sets[0]}


def validation_sets(scale: float = 1.0) -> dict:
    """Where candidate models are compared (never on `standard_sets` test or unseen): the same
    classes as train/test and the held-back types, seeds of their own, training geometry pool."""
    from dials_diffnet.spi.particles import SEEN_TYPES, UNSEEN_TYPES

    per_class = max(6, int(round(10 * scale)))  # few-shot scoring draws 5 support patterns per class, plus queries
    return {
        "test": balanced_specs("validation", SEEN_TYPES, per_class, pool="train"),
        "unseen": balanced_specs("validation", UNSEEN_TYPES, per_class, pool="train", offset=100_000),
    }
