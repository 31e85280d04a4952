"""Labelled shard datasets written by the simulator, read for training and evaluation.

A dataset is a directory holding `index.json` and shards `shard_NNNNN.npz`:

    index.json  {"representation_version": 1, "planes": P, "grid": [256, 0.8], "shards": [names],
                 "recipe": {...}, "n_images": N}
    shard       x (N, P, size, size) float16, the output of `representation.represent`
                (P = 2, or 3 with the cell signal-to-noise plane; "planes" absent means 2),
                and one value per image for each name in LABELS.

A model reads the leading planes it was built for, so a 3-plane set also serves 2-plane models.

Inputs are never recomputed here. Shards written uncompressed (`np.savez`) are
memory-mapped, so a training set far larger than RAM streams from the page
cache; compressed shards are decompressed one at a time and kept in a small
cache, and `ShardSampler` then visits a few shards at a time to keep that cheap.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from dials_diffnet.representation import N_CHANNELS, REPRESENTATION_VERSION

# Per-image labels every shard carries (name -> dtype when loaded).
LABELS = {
    "s_min": np.float32,  # label resolution as 1/d (1/Angstrom)
    "d_min": np.float32,  # Angstrom; inf for blanks
    "edge_limited": bool,  # label limited by the detector edge: true resolution at least this good
    "is_hit": bool,
    "is_multi": bool,
    "n_lattices": np.int8,
    "minority_share": np.float32,  # weaker lattice's share of detectable spots; 0 if single
    "misorientation_deg": np.float32,  # NaN if single
    "n_detectable": np.int32,  # spots with expected I/sigma >= 3 (a hit has >= 10); -1 if not stored
    "detector": str,
    "seed": np.int64,
}
# Labels added after shards were first written, and the value older shards read as.
OPTIONAL_LABELS = {"n_detectable": -1}
# The labels a training batch carries as tensors (the rest stay for evaluation).
BATCH_LABELS = ("s_min", "edge_limited", "is_hit", "is_multi")


class DatasetError(Exception):
    """A dataset directory that is missing, malformed or made for another representation."""


@dataclass
class Shard:
    path: pathlib.Path
    start: int  # index of this shard's first image in the dataset
    n: int


class ShardDataset(torch.utils.data.Dataset):
    """All images of one or more dataset directories; item i -> (x, labels dict).

    x stays float16 as stored (half the bytes to collate and copy to a GPU);
    the training and evaluation loops convert it to float32 on the device.

    `indices` restricts the dataset to a subset (a split); `augment` applies a
    random element of the square's symmetry group (90 degree rotations and flips),
    drawn from (seed, epoch, image) so that results do not depend on worker count
    and a resumed run repeats the same draws. Call `set_epoch` at each epoch.
    """

    def __init__(self, directories, indices=None, augment=False, seed=0, planes=N_CHANNELS):
        if isinstance(directories, (str, pathlib.Path)):
            directories = [directories]
        self.directories = [pathlib.Path(d) for d in directories]
        self.indexes = [read_index(d) for d in self.directories]
        for directory, index in zip(self.directories, self.indexes):
            if index.get("planes", N_CHANNELS) < planes:
                raise DatasetError(f"{directory} holds {index.get('planes', N_CHANNELS)} representation planes; "
                                   f"this model reads {planes} (diffnet.simulate planes={planes} makes them)")
        self.planes = planes
        grids = {tuple(ix["grid"]) for ix in self.indexes}
        if len(grids) != 1:
            raise DatasetError(f"datasets use different grids {sorted(grids)}")
        self.grid = grids.pop()
        self.shards, labels = [], {k: [] for k in LABELS}
        start = 0
        for directory, index in zip(self.directories, self.indexes):
            for name in index["shards"]:
                shard_labels = read_labels(directory / name)
                n = len(shard_labels["s_min"])
                self.shards.append(Shard(directory / name, start, n))
                for k in LABELS:
                    labels[k].append(shard_labels[k])
                start += n
        self.labels_all = {k: np.concatenate(v) if v else np.zeros(0, LABELS[k]) for k, v in labels.items()}
        self._shard_of = np.concatenate([np.full(s.n, i) for i, s in enumerate(self.shards)] or [np.zeros(0, int)])
        self.indices = np.arange(start) if indices is None else np.asarray(indices, dtype=np.int64)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.indices)

    @property
    def labels(self) -> dict:
        """Labels of the images in this (sub)set, in item order."""
        return {k: v[self.indices] for k, v in self.labels_all.items()}

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def subset(self, indices, augment=None) -> "ShardDataset":
        """The same files restricted to `indices` (positions in the whole dataset)."""
        other = object.__new__(ShardDataset)
        other.__dict__.update(self.__dict__)
        other.indices = np.asarray(indices, dtype=np.int64)
        other.augment = self.augment if augment is None else augment
        return other

    def shard_of_items(self) -> np.ndarray:
        """Shard number of each item; lets a sampler keep reads local."""
        return self._shard_of[self.indices]

    def memory_mapped(self) -> bool:
        return all(_memmap_x(str(s.path)) is not None for s in self.shards)

    def __getitem__(self, item):
        i = int(self.indices[item])
        shard = self.shards[self._shard_of[i]]
        x = np.array(_open_x(str(shard.path))[i - shard.start, : self.planes], dtype=np.float16)  # a copy, off the map
        if self.augment:
            x = square_symmetry(x, (self.seed, self.epoch, i))
        labels = {k: torch.as_tensor(self.labels_all[k][i]) for k in BATCH_LABELS}
        return torch.from_numpy(x), labels


def square_symmetry(x: np.ndarray, key) -> np.ndarray:
    """x (C, S, S) under one of the square's 8 symmetries (90 degree rotations, flips), drawn from `key`.

    The grid is centred on the beam, so these are the symmetries the physics
    leaves undecided (detector orientation and handedness)."""
    rng = np.random.default_rng(key)
    x = np.rot90(x, k=int(rng.integers(4)), axes=(1, 2))
    if rng.integers(2):
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x)


def read_index(directory) -> dict:
    path = pathlib.Path(directory) / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{directory} is not a dataset: no index.json") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    for key in ("representation_version", "grid", "shards"):
        if key not in index:
            raise DatasetError(f"{path} lacks {key!r}")
    if index["representation_version"] != REPRESENTATION_VERSION:
        raise DatasetError(
            f"{directory} holds representation version {index['representation_version']}, "
            f"this code makes version {REPRESENTATION_VERSION}"
        )
    missing = [s for s in index["shards"] if not (pathlib.Path(directory) / s).is_file()]
    if missing:
        raise DatasetError(f"{directory}: shard files missing: {missing[:3]}")
    return index


def read_labels(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("x", *LABELS) if k not in z.files and k not in OPTIONAL_LABELS]
        if missing:
            raise DatasetError(f"{path} lacks arrays {missing}")
        n = len(z["seed"])
        return {k: z[k].astype(t) if k in z.files else np.full(n, OPTIONAL_LABELS[k], t) for k, t in LABELS.items()}


def _open_x(path: str) -> np.ndarray:
    """The shard's `x` array: memory-mapped when stored uncompressed, else decompressed."""
    mapped = _memmap_x(path)
    return mapped if mapped is not None else _decompress_x(path)


@functools.lru_cache(maxsize=4)  # a few decompressed shards at a time (ShardSampler.window)
def _decompress_x(path: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z["x"]


@functools.lru_cache(maxsize=1024)  # maps cost no memory; keep them open
def _memmap_x(path: str):
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        # Local file header: 30 fixed bytes, then the name and an extra field of stated lengths.
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        f.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        raise DatasetError(f"{path}: x stored in Fortran order")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def split_indices(dataset: ShardDataset, val_fraction: float, seed: int):
    """(train, val) positions, decided per image from its simulation seed, so the split
    does not change when shards are added, reordered or read in another order."""
    h = _mix64(dataset.labels_all["seed"].astype(np.uint64) ^ _mix64(np.array([seed], np.uint64)))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    is_val = u < val_fraction
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _mix64(v: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a well-mixed 64-bit hash, vectorised."""
    with np.errstate(over="ignore"):
        v = (v + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return v ^ (v >> np.uint64(31))


class ShardSampler(torch.utils.data.Sampler):
    """Seeded shuffle, the same for the same (seed, epoch).

    Memory-mapped data is shuffled globally. Otherwise shards are taken `window`
    at a time in random order and their images shuffled together, so only a few
    decompressed shards need to be held.
    """

    def __init__(self, dataset: ShardDataset, seed=0, window=None):
        self.shard = dataset.shard_of_items()
        self.window = window
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.shard)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.window is None:
            return iter(rng.permutation(len(self.shard)).tolist())
        shards = rng.permutation(np.unique(self.shard))
        order = []
        for k in range(0, len(shards), self.window):
            items = np.flatnonzero(np.isin(self.shard, shards[k : k + self.window]))
            order.extend(rng.permutation(items).tolist())
        return iter(order)


def write_shard(path, x: np.ndarray, labels: dict):
    """Write one shard uncompressed (so it memory-maps); used by the simulator and by tests."""
    arrays = {"x": np.asarray(x, dtype=np.float16)}
    n = len(arrays["x"])
    arrays.update({k: np.asarray(labels[k] if k in labels else np.full(n, OPTIONAL_LABELS[k]), dtype=t if t is not str else np.str_)
                   for k, t in LABELS.items()})
    tmp = pathlib.Path(str(path) + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def write_index(directory, shards, n_images, recipe=None, grid=(256, 0.8), planes=N_CHANNELS, **fields) -> dict:
    """index.json of a shard directory: what ShardDataset reads, and any further `fields` (seeds, label
    definitions, ...) the writer wants kept with the data."""
    index = {
        "representation_version": REPRESENTATION_VERSION,
        "planes": planes,
        "grid": list(grid),
        "shards": list(shards),
        "recipe": recipe or {},
        "n_images": int(n_images),
        **fields,
    }
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "index.json", (json.dumps(index, indent=1) + "\n").encode())
    return index


def atomic_write(path, data: bytes):
    """Readers never see half a file. The temporary name is this process's own: the shard workers of one
    data set all write its index.json, and with a shared name one worker's rename took another's file away."""
    path = pathlib.Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
