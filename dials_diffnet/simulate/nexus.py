"""Write simulated stills as one NXmx (NeXus/HDF5) file, as an Eiger at an SSX beamline does.

Many images share one file and one detector geometry; each image may have its own
wavelength. dxtbx's FormatNXmx reads the file back (`dials.import shots.nxs`): with no
goniometer axis on the sample the images import as stills.

As a Dectris detector does, the frames are bitshuffle-LZ4 compressed (HDF5 filter 32008,
from Debian's `bitshuffle` package, which `make setup` installs: without it no Eiger file
opens), and the static mask goes into `detector/pixel_mask` (bit 0: gap, bit 1: dead,
bit 4: noisy/hot; 0 is a good pixel), which dxtbx turns into the ImageSet's mask.
Only single-panel detectors are written (one NXdetector_module).
"""

from __future__ import annotations

import os

import h5py
import numpy as np

# NeXus uses McStas coordinates (z along the beam, y up); dxtbx the imgCIF frame.
# The change of frame is its own inverse: x -> -x, z -> -z.
_MCSTAS_FROM_IMGCIF = np.diag([-1.0, 1.0, -1.0])
PIXEL_MASK_GAP, PIXEL_MASK_HOT = 1, 16
BITSHUFFLE_FILTER, BITSHUFFLE_LZ4 = 32008, (0, 2)  # filter id; (automatic block size, LZ4)


def _string(group, name, value):
    group.create_dataset(name, data=np.bytes_(value))


def _nx_group(parent, name, nx_class):
    group = parent.create_group(name)
    group.attrs["NX_class"] = np.bytes_(nx_class)
    return group


def _axis(group, name, value, kind, vector, depends_on, units, offset=(0.0, 0.0, 0.0)):
    axis = group.create_dataset(name, data=np.float64(value))
    axis.attrs["transformation_type"] = np.bytes_(kind)
    axis.attrs["vector"] = np.asarray(vector, dtype=np.float64)
    axis.attrs["offset"] = np.asarray(offset, dtype=np.float64)
    axis.attrs["offset_units"] = np.bytes_("mm")
    axis.attrs["units"] = np.bytes_(units)
    axis.attrs["depends_on"] = np.bytes_(depends_on)
    return axis


def write_nexus(path, detector, frames, pixel_mask=None, integer=True) -> int:
    """Write `frames`, an iterable of (wavelength in Å, 2-D array) one per shot, of one single-panel
    dxtbx `detector` to an NXmx file at `path`, atomically; returns the number of frames. Frames are
    written as they come (a run of thousands never sits in memory). The data are int32 (counts
    rounded) when `integer`, else float32 (an integrating detector's calibrated values).

    `pixel_mask` (uint32, the panel's shape, 0 = good) is stored as the detector's pixel mask;
    the data keep whatever values the caller gives there.
    """
    if len(detector) != 1:
        raise ValueError("write_nexus writes single-panel detectors (one NXdetector_module)")
    if not h5py.h5z.filter_avail(BITSHUFFLE_FILTER):
        raise RuntimeError("the HDF5 bitshuffle filter is missing (Debian: apt-get install bitshuffle)")
    panel = detector[0]
    nf, ns = panel.get_image_size()
    lo, hi = panel.get_trusted_range()
    origin = _MCSTAS_FROM_IMGCIF @ np.asarray(panel.get_origin())
    tmp = f"{path}.part"
    with h5py.File(tmp, "w") as f:
        entry = _nx_group(f, "entry", "NXentry")
        _string(entry, "definition", "NXmx")
        _string(entry, "start_time", "2026-01-01T00:00:00Z")

        instrument = _nx_group(entry, "instrument", "NXinstrument")
        _string(instrument, "name", "diffnet simulator")

        nxdetector = _nx_group(instrument, "detector", "NXdetector")
        _string(nxdetector, "sensor_material", "Si")
        nxdetector.create_dataset("sensor_thickness", data=np.float64(0.45))
        nxdetector["sensor_thickness"].attrs["units"] = np.bytes_("mm")
        # dxtbx reads trusted_range as (underload - 1, saturation)
        nxdetector.create_dataset("underload_value", data=np.int64(round(lo + 1)))
        nxdetector.create_dataset("saturation_value", data=np.int64(round(hi)))
        if pixel_mask is not None:
            nxdetector.create_dataset("pixel_mask", data=np.asarray(pixel_mask, dtype=np.uint32), compression="gzip")
            nxdetector.create_dataset("pixel_mask_applied", data=np.int8(1))
        module = _nx_group(nxdetector, "module", "NXdetector_module")
        module.create_dataset("data_origin", data=np.array([0, 0], dtype=np.int64))
        module.create_dataset("data_size", data=np.array([ns, nf], dtype=np.int64))
        # One translation puts the panel's first pixel where the detector model has it; the pixel
        # directions hang from it, so dxtbx rebuilds the same origin, axes and pixel size.
        distance = float(np.linalg.norm(origin))
        offset_path = "/entry/instrument/detector/module/module_offset"
        _axis(module, "module_offset", distance, "translation", origin / distance, ".", "mm")
        x_mm, y_mm = panel.get_pixel_size()
        fast = _MCSTAS_FROM_IMGCIF @ np.asarray(panel.get_fast_axis())
        slow = _MCSTAS_FROM_IMGCIF @ np.asarray(panel.get_slow_axis())
        _axis(module, "fast_pixel_direction", x_mm, "translation", fast, offset_path, "mm")
        _axis(module, "slow_pixel_direction", y_mm, "translation", slow, offset_path, "mm")
        _string(nxdetector, "depends_on", offset_path)

        sample = _nx_group(entry, "sample", "NXsample")
        _string(sample, "name", "simulated crystals")  # no depends_on: no goniometer, the images are stills

        data = _nx_group(entry, "data", "NXdata")
        data.attrs["signal"] = np.bytes_("data")
        stack = data.create_dataset(
            "data", shape=(0, ns, nf), maxshape=(None, ns, nf), dtype=np.int32 if integer else np.float32,
            chunks=(1, ns, nf), compression=BITSHUFFLE_FILTER, compression_opts=BITSHUFFLE_LZ4,
        )
        wavelengths = []
        for wavelength, image in frames:
            stack.resize(len(wavelengths) + 1, axis=0)
            stack[len(wavelengths)] = np.rint(image) if integer else image
            wavelengths.append(wavelength)
        if not wavelengths:
            raise ValueError("write_nexus needs at least one frame")
        beam = _nx_group(instrument, "beam", "NXbeam")
        beam.create_dataset("incident_wavelength", data=np.asarray(wavelengths, dtype=np.float64))
        beam["incident_wavelength"].attrs["units"] = np.bytes_("angstrom")
    os.replace(tmp, path)
    return len(wavelengths)
