"""SPI shots on disk: CXI (HDF5, as SPI facilities publish) and mini-CBF files that dxtbx reads.

CXI layout written here (SI units, CXI frame: beam along +z, y up, x = y cross z;
dxtbx's frame is this one turned 180 degrees about y):
    /cxi_version                                   150
    /entry_1/data_1/data                           link to detector_1/data
    /entry_1/instrument_1/detector_1/data          (N, 1056, 1024) float32 photons
    /entry_1/instrument_1/detector_1/mask          (1056, 1024) uint32, nonzero = bad pixel (gap, beamstop hole)
    /entry_1/instrument_1/detector_1/distance      m, scalar or (N,)
    /entry_1/instrument_1/detector_1/x_pixel_size, y_pixel_size   m
    /entry_1/instrument_1/detector_1/corner_position   (3,) or (N, 3) m, outer corner of the first pixel
    /entry_1/instrument_1/detector_1/basis_vectors     (2, 3) m, one slow and one fast pixel step
    /entry_1/instrument_1/source_1/energy          J, scalar or (N,)
    /entry_1/spi_labels/...                        sidecar: count, particle, seed, noise, pool, fluence,
                                                   energy_kev, distance_mm, readout_sigma, rotations, offsets,
                                                   and optionally `label` (a user's class name for few-shot)
`read_cxi` yields the same RawImage that `images.read_image` gives for dxtbx input.
"""

from __future__ import annotations

import json
import pathlib

import h5py
import numpy as np

from dials_diffnet.images import RawImage
from dials_diffnet.representation import BeamGeometry, PanelGeometry
from dials_diffnet.spi.simulate import KEV_ANGSTROM, MAX_COUNT, SpiShot

JOULE_PER_KEV = 1.602176634e-16
CXI_FROM_DXTBX = np.array([-1.0, 1.0, -1.0])  # 180 degrees about y, its own inverse
LABELS = "/entry_1/spi_labels"


def _per_shot(values):
    """A scalar when every shot agrees (the usual CXI file), else one value per shot."""
    values = np.asarray(values)
    return values[0] if np.all(values == values[0]) else values


def write_cxi(path, shots: list[SpiShot], user_labels: list[str] | None = None) -> pathlib.Path:
    if not shots:
        raise ValueError("no shots to write")
    path = pathlib.Path(path)
    frames = np.stack([np.where(s.valid, s.image, 0.0).astype(np.float32) for s in shots])
    mask = (~shots[0].valid).astype(np.uint32)
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 150
        det = f.create_group("entry_1/instrument_1/detector_1")
        det.create_dataset("data", data=frames, chunks=(1,) + frames.shape[1:], compression="gzip",
                           compression_opts=1, shuffle=True)
        det["data"].attrs["axes"] = "experiment_identifier:y:x"
        det["mask"] = mask
        panels = [s.panel for s in shots]
        det["distance"] = _per_shot([-p.origin[2] / 1000.0 for p in panels])
        det["x_pixel_size"] = panels[0].pixel_size[0] / 1000.0
        det["y_pixel_size"] = panels[0].pixel_size[1] / 1000.0
        det["corner_position"] = _per_shot([np.asarray(p.origin) * CXI_FROM_DXTBX / 1000.0 for p in panels])
        p0 = panels[0]
        det["basis_vectors"] = np.array(
            [np.asarray(p0.slow) * p0.pixel_size[1], np.asarray(p0.fast) * p0.pixel_size[0]]
        ) * CXI_FROM_DXTBX / 1000.0
        det["description"] = "pnCCD-like: two 1024 x 512 halves, 75 um pixels, gap and beamstop hole masked"
        src = f.create_group("entry_1/instrument_1/source_1")
        src["energy"] = _per_shot([KEV_ANGSTROM / s.beam.wavelength * JOULE_PER_KEV for s in shots])
        src["energy"].attrs["units"] = "J"
        f["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        _write_labels(f.create_group(LABELS), shots, user_labels)
    return path


def _write_labels(group, shots, user_labels):
    params = [s.params for s in shots]
    for key in ("count", "seed", "fluence", "energy_kev", "distance_mm", "readout_sigma"):
        group[key] = np.array([getattr(p, key) for p in params])
    for key in ("particle", "noise", "pool"):
        group[key] = np.array([getattr(p, key) for p in params], dtype=h5py.string_dtype())
    rotations = np.full((len(params), MAX_COUNT, 3, 3), np.nan)
    offsets = np.full((len(params), MAX_COUNT, 3), np.nan)
    for i, p in enumerate(params):
        rotations[i, : p.count], offsets[i, : p.count] = p.rotations, p.offsets
    group["rotations"], group["offsets"] = rotations, offsets
    group.attrs["description"] = "simulation parameters; simulate.shot_params(seed, particle, count, noise, pool)"
    if user_labels is not None:
        group["label"] = np.array(user_labels, dtype=h5py.string_dtype())


def _geometry(det, src, i):
    def pick(ds):
        v = ds[()]
        return v[i] if np.ndim(v) > (1 if ds.name.endswith("corner_position") else 0) else v

    corner = np.asarray(pick(det["corner_position"]), float) * CXI_FROM_DXTBX * 1000.0
    slow_step, fast_step = (np.asarray(v, float) * CXI_FROM_DXTBX * 1000.0 for v in det["basis_vectors"][()])
    n_slow, n_fast = det["data"].shape[1:]
    panel = PanelGeometry(
        origin=tuple(corner),
        fast=tuple(fast_step / np.linalg.norm(fast_step)),
        slow=tuple(slow_step / np.linalg.norm(slow_step)),
        pixel_size=(float(np.linalg.norm(fast_step)), float(np.linalg.norm(slow_step))),
        image_size=(int(n_fast), int(n_slow)),
    )
    energy_kev = float(pick(src["energy"])) / JOULE_PER_KEV
    return (panel,), BeamGeometry(direction=(0.0, 0.0, -1.0), wavelength=KEV_ANGSTROM / energy_kev)


def read_cxi(path):
    """Yield RawImage(pixels, valid, panels, beam) for every frame of a CXI file.

    Raises OSError/KeyError with a readable message for a file that is not CXI or lacks geometry.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise OSError(f"{path} is not a readable HDF5/CXI file: {e}") from None
    with f:
        try:
            data = f["entry_1/data_1/data"]
            det = f["entry_1/instrument_1/detector_1"]
            src = f["entry_1/instrument_1/source_1"]
        except KeyError as e:
            raise KeyError(f"{path} lacks CXI item {e}") from None
        if data.ndim == 2:
            raise KeyError(f"{path}: expected a stack of frames (N, y, x) in /entry_1/data_1/data")
        bad = det["mask"][()] != 0 if "mask" in det else np.zeros(data.shape[1:], bool)
        for i in range(data.shape[0]):
            frame = data[i].astype(np.float32)
            valid = ~bad & np.isfinite(frame) & (frame >= 0)
            panels, beam = _geometry(det, src, i)
            yield RawImage(pixels=[frame], valid=[valid], panels=panels, beam=beam)


def _per_frame(name: str, dataset, n_frames: int) -> bool:
    """Whether a CXI dataset holds one entry per frame (read_cxi's rules for the geometry it reads;
    anything else whose first axis has one entry per frame)."""
    base = name.rsplit("/", 1)[-1]
    if base in ("mask", "basis_vectors"):
        return False
    if base == "corner_position":
        return dataset.ndim == 2
    return dataset.ndim >= 1 and dataset.shape[0] == n_frames


def write_cxi_frames(source, destination, frames) -> None:
    """A copy of the CXI file `source` that holds only `frames` (indices into /entry_1/data_1/data, in
    order): per-frame datasets sliced, everything else (geometry, mask, attributes, links) copied."""
    frames = np.asarray(frames, dtype=int)
    with h5py.File(source, "r") as src, h5py.File(destination, "w") as dst:
        n_frames = src["entry_1/data_1/data"].shape[0]

        def copy_group(group_in, group_out):
            group_out.attrs.update(group_in.attrs)
            for name in group_in:
                link = group_in.get(name, getlink=True)
                if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                    group_out[name] = link
                elif isinstance(group_in[name], h5py.Group):
                    copy_group(group_in[name], group_out.create_group(name))
                else:
                    copy_dataset(group_in[name], group_out, name)

        def copy_dataset(ds, group_out, name):
            if not _per_frame(ds.name, ds, n_frames):
                group_out.create_dataset(name, data=ds[()], dtype=ds.dtype)
            elif ds.ndim == 3:  # frames: one at a time, chunked and compressed as write_cxi writes them
                out = group_out.create_dataset(name, shape=(len(frames),) + ds.shape[1:], dtype=ds.dtype,
                                               chunks=(1,) + ds.shape[1:], maxshape=(None,) + ds.shape[1:],
                                               compression="gzip", compression_opts=1, shuffle=True)
                for k, i in enumerate(frames):
                    out[k] = ds[i]
            else:
                group_out.create_dataset(name, data=ds[()][frames], dtype=ds.dtype)
            group_out[name].attrs.update(ds.attrs)

        copy_group(src, dst)


def cxi_length(path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["entry_1/data_1/data"].shape[0])


def read_cxi_labels(path) -> dict | None:
    """The sidecar label arrays ({name: array}, strings decoded), or None when the file has none."""
    with h5py.File(path, "r") as f:
        if LABELS not in f:
            return None
        out = {}
        for key, ds in f[LABELS].items():
            v = ds[()]
            out[key] = np.array([s.decode() if isinstance(s, bytes) else s for s in v]) if v.dtype.kind in "OS" else v
        return out


def write_cbf(path, shot: SpiShot) -> pathlib.Path:
    """One shot as a mini-CBF file dxtbx/dials.import reads: the assembled frame, whole photons,
    gap and beamstop-hole pixels -1 (below dxtbx's trusted range, so masked). Labels go to <stem>.json."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory
    from scitbx.array_family import flex

    path = pathlib.Path(path).with_suffix(".cbf")
    panel = shot.panel
    n_fast, n_slow = panel.image_size
    distance = -panel.origin[2]
    detector = DetectorFactory.simple(
        "PAD", distance, (-panel.origin[0], panel.origin[1]), "+x", "-y", panel.pixel_size,
        (n_fast, n_slow), (-1, 2**30), [],
    )
    beam = BeamFactory.simple(shot.beam.wavelength)
    counts = np.where(shot.valid, np.rint(shot.image), -1).astype(np.int32)
    FormatCBFMini.as_file(detector, beam, None, None, flex.int(counts), str(path))
    path.with_suffix(".json").write_text(json.dumps(shot.params.labels()) + "\n")
    return path
