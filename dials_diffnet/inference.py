"""Batched inference over every image of an ExperimentList.

A *task* bundles the model(s) with the grid and planes they read: `predict_batch`
turns a batch of representations (B, planes, S, S) into one dict of fields per image. The
crystallography task is here; an SPI task plugs in by the same protocol.

Images are read by DataLoader worker processes while the model runs. Each
worker loads the ExperimentList itself from the .expt file (dxtbx objects are
never pickled) and builds its own grid maps. An image that cannot be read or
judged gives a failure reason instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
from typing import Protocol

import libtbx
import numpy as np
import torch
from dials.util import Sorry, progress
from dxtbx.format.Registry import get_format_class_for_file
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_diffnet.images import beam_geometry, cbflib_quiet, detector_geometry, iter_image_refs, read_image
from dials_diffnet.models.views import ViewAveraged, check_view_count
from dials_diffnet.representation import CRYSTAL_GRID, N_CHANNELS, GridSpec, cached_grid_map, represent
from dials_diffnet.results import ImageRecord, failed_record, predicted_record
from dials_diffnet.util import one_line
from dials_diffnet.weights import WeightError, card_planes, load_model

logger = logging.getLogger("dials.diffnet.inference")

# s_min below this (d_min beyond 10^4 A) means "no diffraction": keeps d_min finite.
MIN_S_MIN = 1e-4


class Task(Protocol):
    name: str
    grid: GridSpec
    planes: int  # representation planes its models read (representation.represent)
    models: dict  # model name -> summary for the records file (name, version, sha256)
    reflection_columns: tuple  # float fields copied onto reflections as diffnet_<field>
    device: torch.device

    def predict_batch(self, x: torch.Tensor) -> list[dict]: ...


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU; cuda[:N] without such a GPU -> Sorry."""
    name = str(name).strip().lower()  # PHIL gives libtbx.Auto for "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise Sorry(f"device={name} not understood: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise Sorry(f"device={name} asked for, but no CUDA GPU is available here; use device=cpu or device=auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise Sorry(f"device={name} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are present")
    return torch.device("cuda", index)


def autocast(device: torch.device):
    """Mixed precision on CUDA only (bf16 where supported); CPU runs in float32 so reruns agree."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def load_task_model(weights_path, device: torch.device):
    """(model, model card); Sorry for a missing, tampered or incompatible file."""
    try:
        return load_model(weights_path, device)
    except WeightError as e:
        raise Sorry(one_line(e)) from None


def card_summary(card: dict) -> dict:
    """What the records file says of a model; for a crystal model whose card records the P(hit) bar chosen
    for it, that bar too (diffnet.filter min_p_hit=Auto reads it from the records file)."""
    summary = {k: card.get(k) for k in ("name", "version", "sha256", "representation_version")}
    if "operating_point" in card:
        summary["min_p_hit"] = card["operating_point"]["min_p_hit"]
    return summary


class CrystalTask:
    """Resolution, multi-lattice and hit probability from one CrystalNet."""

    name = "crystal"
    grid = CRYSTAL_GRID
    reflection_columns = ("d_min", "p_multi", "p_hit")

    def __init__(self, weights_path, device="cpu", views=1):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        model, card = load_task_model(weights_path, self.device)
        # channels-last convolutions run ~1.5x faster on CPU (oneDNN) and use tensor cores on GPU
        self.model = ViewAveraged(model.to(memory_format=torch.channels_last), views)
        self.planes = card_planes(card)
        self.models = {"crystal": dict(card_summary(card), views=views, planes=self.planes)}

    def predict_batch(self, x: torch.Tensor) -> list[dict]:
        with torch.inference_mode(), autocast(self.device):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = self.model(x)
        s_min = out["s_min"].float().clamp_min(MIN_S_MIN).cpu().numpy()
        p_multi = torch.sigmoid(out["multi_logit"].float()).cpu().numpy()
        p_hit = torch.sigmoid(out["hit_logit"].float()).cpu().numpy()
        return [
            {"d_min": float(1.0 / s), "s_min": float(s), "p_multi": float(m), "p_hit": float(h)}
            for s, m, h in zip(s_min, p_multi, p_hit)
        ]


# Views averaged when `views=Auto`: on a CPU, two keep the crystal model within the readers' time per
# image (BENCHMARKS.md); for SPI, four counted as well as eight on the validation set at half the cost.
DEFAULT_VIEWS = {"crystal": 2, "spi": 4}


def resolve_views(views, task_name: str) -> int:
    if views in (None, libtbx.Auto):
        return DEFAULT_VIEWS[task_name]
    try:
        return check_view_count(views)
    except ValueError as e:
        raise Sorry(f"{e} (or Auto: the task's default)") from None


def make_task(name: str, params, device: str) -> Task:
    """The task named by the `task` parameter, with its models from `params.model`."""
    if name not in DEFAULT_VIEWS:
        raise Sorry(f"unknown task={name}")
    torch_device = resolve_device(device)
    views = resolve_views(params.views, name)
    if name == "crystal":
        from dials_diffnet.weights import shipped_path

        if params.model.crystal is not None and params.model.fast:
            raise Sorry("model.fast=True picks a shipped model; leave it out when giving model.crystal=")
        path = params.model.crystal or shipped_path("crystal_fast" if params.model.fast else "crystal")
        if params.model.crystal is None and not path.is_file():
            raise Sorry(f"the shipped crystal model ({path}) is not installed; pass model.crystal=<file.safetensors>")
        return CrystalTask(path, torch_device, views)
    if name == "spi":
        from dials_diffnet.spi.task import SpiTask

        return SpiTask(
            reference=params.spi.reference, device=torch_device,
            multi_path=params.model.spi_multi, twin_path=params.model.spi_twin, views=views,
        )


# --- per-image checks --------------------------------------------------------------------------


def image_failure(raw, trusted_max, max_saturated_fraction: float) -> str | None:
    """Why an image cannot be judged, or None. `trusted_max`: per-panel upper trusted values.

    Counted panel by panel, without concatenating or masking copies: this runs on every image.
    """
    n_finite = n_finite_nonzero = n_valid = n_at_max = 0
    for pixels, valid, hi in zip(raw.pixels, raw.valid, trusted_max):
        pixels, valid = np.asarray(pixels), np.asarray(valid)
        if pixels.dtype.kind in "iu":  # integers are all finite: skip the float checks
            n_finite += pixels.size
            n_finite_nonzero += np.count_nonzero(pixels)
        else:
            finite = np.isfinite(pixels)
            n_finite += np.count_nonzero(finite)
            n_finite_nonzero += np.count_nonzero(finite & (pixels != 0))
        with np.errstate(invalid="ignore"):  # NaN compares False, quietly
            if pixels.dtype.kind not in "iu" or (pixels.size and pixels.max() >= hi):  # skips two passes on most
                n_at_max += np.count_nonzero(valid & (pixels >= hi))
        n_valid += np.count_nonzero(valid)
    n_masked = sum(np.size(v) for v in raw.valid) - n_valid
    if n_valid and n_finite_nonzero and n_finite_nonzero <= n_masked:  # every nonzero pixel may be a masked one
        n_finite_nonzero = sum(np.count_nonzero(np.asarray(v) & np.isfinite(p) & (np.asarray(p) != 0))
                               for p, v in zip(raw.pixels, raw.valid))
    if n_finite == 0:
        return "no finite pixel values (NaN/inf everywhere)"
    if n_finite_nonzero == 0:
        return "all pixels are zero"
    if n_valid == 0:
        return "no valid pixels (all masked or outside the trusted range)"
    if n_at_max > max_saturated_fraction * n_valid:
        return f"saturated: {n_at_max / n_valid:.0%} of valid pixels at the trusted maximum"
    return None


# --- reading -----------------------------------------------------------------------------------


def _frames_merged(document) -> tuple[dict, dict]:
    """The .expt document with the one-frame still ImageSets that point into one multi-image file
    (an Eiger's NeXus run, as dials.import writes it: an ImageSet per frame) merged into one ImageSet
    per file, and {original ImageSet entry: position of its frame in the merged one}.

    dxtbx builds a new format instance for every ImageSet entry, which re-reads the file's header
    and pixel mask: 0.33 s per still of an Eiger 16M run (BENCHMARKS.md), hours for a run of
    thousands. Merged, each file is opened once. Entries differing in anything but the frame
    (file, external mask, gain, format parameters) are not merged.
    """
    merged_entries, merged_of, position = [], {}, {}
    target = {}  # original entry -> merged entry
    frame_positions = {}  # merged entry -> {frame in the file: its position in the merged entry}
    for i, entry in enumerate(document.get("imageset", [])):
        frames = entry.get("single_file_indices")
        if entry.get("__id__") != "ImageSet" or frames is None or len(frames) != 1 or len(entry["images"]) != 1:
            target[i] = len(merged_entries)
            merged_entries.append(entry)
            continue
        key = json.dumps({k: v for k, v in entry.items() if k != "single_file_indices"}, sort_keys=True)
        if key not in merged_of:
            merged_of[key] = len(merged_entries)
            frame_positions[merged_of[key]] = {}
            merged_entries.append(dict(entry, images=[], single_file_indices=[]))
        target[i] = merged_of[key]
        merged, positions = merged_entries[target[i]], frame_positions[target[i]]
        if frames[0] not in positions:  # two experiments (lattices) may share a frame
            positions[frames[0]] = len(merged["single_file_indices"])
            merged["images"].append(entry["images"][0])
            merged["single_file_indices"].append(frames[0])
        position[i] = positions[frames[0]]
    experiments = [dict(e, imageset=target[e["imageset"]]) if e.get("imageset") in target else e
                   for e in document.get("experiment", [])]
    return dict(document, imageset=merged_entries, experiment=experiments), position


def file_problem(path) -> str | None:
    """What is wrong with an image file, if it is missing, empty or of no format dxtbx knows; else None."""
    try:
        if os.path.getsize(path) == 0:
            return "empty"
    except OSError:
        return "missing"
    try:
        return None if get_format_class_for_file(path) else "not an image dxtbx can read"
    except Exception:
        return None


def unreadable(error, path, first_path=None) -> str:
    """The failure reason of an image dxtbx could not open or read: what is wrong with its file, or
    with the first file of its ImageSet (which dxtbx opens the set by), when that can be told;
    otherwise dxtbx's own message."""
    problem = file_problem(path)
    if problem:
        return f"unreadable: the file is {problem}"
    problem = file_problem(first_path) if first_path not in (None, path) else None
    if problem:
        return f"unreadable: {first_path}, the first file of its image set, is {problem}"
    return f"unreadable: {one_line(error) or type(error).__name__}"


def _image_sources(expt_path) -> list:
    """For every image (iter_image_refs order): (imageset, index) to read it, or the reason it can't be.

    The frames of a multi-image file are read through one ImageSet (`_frames_merged`), each
    with its own experiment's beam and detector. dxtbx refuses a whole .expt if the first file
    of any ImageSet is missing or unrecognised, so on failure each ImageSet is loaded on its
    own and only its images are marked.
    """
    with open(expt_path) as f:
        document = json.load(f)
    try:
        merged, position = _frames_merged(document)
        directory = os.path.dirname(os.path.abspath(expt_path))  # relative image paths are relative to the .expt
        experiments = ExperimentListFactory.from_dict(merged, check_format=True, directory=directory)
        sources = []
        for ref in iter_image_refs(ExperimentListFactory.from_dict(document, check_format=False, directory=directory)):
            entry = document["experiment"][ref.experiment_index].get("imageset")
            if entry not in position:
                sources.append((experiments[ref.experiment_index].imageset, ref.index))
                continue
            experiment, frame = experiments[ref.experiment_index], position[entry]
            experiment.imageset.set_beam(experiment.beam, frame)
            experiment.imageset.set_detector(experiment.detector, frame)
            sources.append((experiment.imageset, frame))
        return sources
    except Exception:
        pass
    per_experiment = {}
    for i_imageset in range(len(document.get("imageset", []))):
        members = [i for i, e in enumerate(document["experiment"]) if e.get("imageset") == i_imageset]
        if not members:
            continue
        part = dict(document, experiment=[document["experiment"][i] for i in members])
        try:
            experiments = ExperimentListFactory.from_dict(part, check_format=True)
            for ref in iter_image_refs(experiments):
                per_experiment.setdefault(members[ref.experiment_index], []).append((ref.imageset, ref.index))
        except Exception as e:
            for i in members:
                per_experiment[i] = e
    formatless = list(iter_image_refs(ExperimentListFactory.from_json_file(str(expt_path), check_format=False)))
    first_path = {}  # experiment -> the first file of its ImageSet: dxtbx opens the set by that file
    for ref in formatless:
        first_path.setdefault(ref.experiment_index, ref.imageset.get_path(0))
    sources, position = [], {}
    for ref in formatless:
        entry = per_experiment.get(ref.experiment_index, "unreadable: no image data")
        if isinstance(entry, Exception):
            sources.append(unreadable(entry, ref.path, first_path[ref.experiment_index]))
        elif isinstance(entry, str):
            sources.append(entry)
        else:
            k = position.get(ref.experiment_index, 0)
            position[ref.experiment_index] = k + 1
            sources.append(entry[k])
    return sources


class ImageDataset(torch.utils.data.Dataset):
    """Item i: (i, representation array, failure reason or ""), for the i-th image of an .expt file.

    Arrays, not tensors: a 512 KB array pickles through the reader's pipe in well under a
    millisecond, while a tensor goes through a new shared-memory segment per item (~7 ms here)."""

    def __init__(self, expt_path, n_images: int, grid: GridSpec, max_saturated_fraction: float, planes=N_CHANNELS):
        self.expt_path = str(expt_path)
        self.n_images = n_images
        self.grid = grid
        self.planes = planes
        self.max_saturated_fraction = max_saturated_fraction
        self._sources = None  # loaded lazily, in the process that reads
        self.parent_pid = os.getpid()

    def __getstate__(self):
        return dict(self.__dict__, _sources=None)

    def forget_sources(self):
        self._sources = None

    def __len__(self):
        return self.n_images

    def __getitem__(self, i):
        with cbflib_quiet():
            if self._sources is None:
                self._sources = _image_sources(self.expt_path)
            x, failure = self._represent(self._sources[i])
        if failure:
            x = np.zeros((self.planes, self.grid.size, self.grid.size), dtype=np.float32)
        return i, x, failure or ""

    def _represent(self, source):
        if isinstance(source, str):
            return None, source
        imageset, index = source
        try:
            raw = read_image(imageset, index)
            # dxtbx keeps each ImageSet's last image: with one ImageSet per still that is every image read
            imageset.clear_cache()
            trusted_max = [p.get_trusted_range()[1] for p in imageset.get_detector(index)]
            return network_input(raw, trusted_max, self.max_saturated_fraction, self.grid, self.planes)
        except Exception as e:  # dxtbx raises many kinds for truncated or corrupt files
            return None, unreadable(e, imageset.get_path(index))


def network_input(raw, trusted_max, max_saturated_fraction: float, grid: GridSpec, planes: int):
    """(representation, None) of an image a network can judge, or (None, why it cannot): the one path
    from a read image, dxtbx's or a CXI frame's, to the networks."""
    failure = image_failure(raw, trusted_max, max_saturated_fraction)
    if failure:
        return None, failure
    x = represent(raw.pixels, raw.valid, cached_grid_map(tuple(raw.panels), raw.beam, grid), planes)
    if not x[1].any():
        return None, "no valid pixels within the resolution range of the grid"
    return x, None


def _libc():
    """glibc through ctypes, or None where there is none (the calls below are then no-ops)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed large blocks for reuse rather than give them back to the kernel.

    Each image allocates and frees arrays of tens of MB (raw data, numpy copy,
    masks). By default glibc maps every such array afresh and the kernel
    zero-fills each page: on 6M-pixel miniCBF stills that was ~40% of a
    reader's time (92 -> 50 ms per image, BENCHMARKS.md). Memory stays flat:
    the same blocks are reused image after image. A no-op where this is not glibc.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocate blocks up to 1 GB from the heap
        libc.mallopt(-1, 2 << 30)  # M_TRIM_THRESHOLD: keep up to 2 GB of freed heap


def _die_with_parent() -> None:
    """Linux: the kernel kills this reader when the main process dies, even by SIGKILL.

    Otherwise a reader blocked on handing over an image (the pipe is full and nobody
    reads it any more) would wait for ever. A no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _start_reader(_worker_id):
    dataset = torch.utils.data.get_worker_info().dataset
    _die_with_parent()
    if os.getppid() != dataset.parent_pid:  # the main process died before the line above took effect
        os._exit(1)
    # A forked worker must open its own files, not share the parent's readers.
    dataset.forget_sources()
    reuse_freed_memory()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the model on n threads, so the readers keep the other cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prewarm_grid_maps(refs, grid: GridSpec, max_geometries: int = 4) -> None:
    """Build the grid map of each of the first few geometries here, before the readers fork.

    Forked readers inherit the cache, so a 6M-pixel map (seconds) is built once,
    not once per reader. Purely an optimisation: a geometry that cannot be read is skipped.
    """
    seen_models, built = set(), set()
    for ref in refs:
        try:
            detector, beam = ref.imageset.get_detector(ref.index), ref.imageset.get_beam(ref.index)
        except Exception:
            continue
        if (id(detector), id(beam)) in seen_models:
            continue
        seen_models.add((id(detector), id(beam)))
        key = (detector_geometry(detector), beam_geometry(beam))
        if key not in built:
            cached_grid_map(*key, grid)
            built.add(key)
            if len(built) == max_geometries:
                return


def _as_is(item):
    return item


def _batches(items, batch_size: int):
    """Consecutive items grouped into lists of up to batch_size."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_images(task: Task, expt_path, refs, *, batch_size=16, nproc=1, max_saturated_fraction=0.5) -> list[ImageRecord]:
    """One record per ref (refs = list(iter_image_refs(experiments)) of the experiments in expt_path).

    Readers hand over one image at a time (so work spreads evenly over them and few
    images are in flight); the model sees batches of batch_size assembled here.
    """
    refs = list(refs)
    reuse_freed_memory()
    dataset = ImageDataset(expt_path, len(refs), task.grid, max_saturated_fraction, task.planes)
    forked = nproc > 0 and torch.multiprocessing.get_start_method() == "fork"
    if forked:
        prewarm_grid_maps(refs, task.grid)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # per image; batching happens below
        shuffle=False,
        num_workers=nproc,
        worker_init_fn=_start_reader if nproc > 0 else None,
        prefetch_factor=4 if nproc > 0 else None,
        collate_fn=_as_is,  # keep items as numpy arrays (see ImageDataset)
    )
    # On CUDA, batches are assembled in page-locked memory so the copy to the GPU runs asynchronously.
    # Reusing the buffer is safe: predict_batch returns host values, so its copy has finished by then.
    pinned = None
    if task.device.type == "cuda":
        pinned = torch.empty((batch_size, task.planes, task.grid.size, task.grid.size)).pin_memory()
    threads = max(1, available_cores() - nproc) if nproc > 0 else torch.get_num_threads()
    records: list[ImageRecord | None] = [None] * len(refs)
    with torch_threads(threads), progress(total=len(refs), desc="diffnet", unit="image") as bar:
        for batch in _batches(loader, batch_size):
            indices, tensors, failures = zip(*batch)
            good = [k for k, f in enumerate(failures) if not f]
            if good:
                x = [torch.from_numpy(tensors[k]) for k in good]
                x = torch.stack(x) if pinned is None else torch.stack(x, out=pinned[: len(good)])
                for k, f in zip(good, task.predict_batch(x)):
                    records[indices[k]] = predicted_record(refs[indices[k]], f)
            for k, failure in enumerate(failures):
                if failure:
                    records[indices[k]] = failed_record(refs[indices[k]], failure)
            bar.update(len(indices))
    return records


# --- CXI input (single-particle imaging) -------------------------------------------------------


def predict_cxi(task: Task, cxi_path, *, batch_size=16) -> list[ImageRecord]:
    """Every frame of a CXI file through the same representation and task as an ImageSet's images.

    A frame is identified by the file and its index in /entry_1/data_1/data (image_number = index + 1).
    """
    from dials_diffnet.images import ImageRef
    from dials_diffnet.spi.cxi import read_cxi

    records: list[ImageRecord | None] = []
    pending: list[tuple[int, ImageRef, np.ndarray]] = []

    def flush():
        if pending:
            fields = task.predict_batch(torch.from_numpy(np.stack([x for _, _, x in pending])))
            for (slot, ref, _), f in zip(pending, fields):
                records[slot] = predicted_record(ref, f)
            pending.clear()

    try:
        for i, raw in enumerate(read_cxi(cxi_path)):
            ref = ImageRef(experiment_index=0, identifier="", imageset=None, index=i, path=os.path.abspath(cxi_path), image_number=i + 1)
            # a CXI file records no trusted range: every check but saturation, as for a dxtbx image
            x, failure = network_input(raw, [np.inf] * len(raw.pixels), 1.0, task.grid, task.planes)
            records.append(failed_record(ref, failure) if failure else None)
            if records[-1] is None:
                pending.append((i, ref, x))
            if len(pending) >= batch_size:
                flush()
        flush()
    except (OSError, KeyError, ValueError) as e:
        raise Sorry(f"cannot read {cxi_path}: {one_line(str(e))}") from None
    return records
