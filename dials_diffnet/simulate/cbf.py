"""Write simulated images as CBF files that `dials.import` reads as stills.

Full imgCIF/CBF (any detector, any number of panels): dxtbx's FullCBFWriter
builds the geometry header from dxtbx models; the pixel arrays are added here
(its own integer path passes a str byte order that Debian's pycbf rejects).

Pilatus miniCBF (one flat panel normal to the beam): what a Pilatus writes at a
beamline, read by dxtbx's FormatCBFMiniPilatus with its fast C++ decoder.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pycbf
from dxtbx.format.cbf_writer import FullCBFWriter
from dxtbx.format.FormatCBFMultiTile import cbf_wrapper
from dxtbx.model import Beam


class _Models:
    """The slice of the ImageSet interface FullCBFWriter reads for a header."""

    def __init__(self, detector, beam, path):
        self._detector, self._beam, self._path = detector, beam, path

    def get_detector(self, index=None):
        return self._detector

    def get_beam(self, index=None):
        return self._beam

    def get_goniometer(self, index=None):
        return None

    def get_scan(self, index=None):
        return None

    def paths(self):
        return [self._path]

    def reader(self):
        return self

    format_class = type("diffnet_simulate", (), {})


def dxtbx_beam(wavelength, direction=(0.0, 0.0, -1.0), polarization=0.999):
    beam = Beam(tuple(-v for v in direction), wavelength)  # dxtbx takes sample-to-source
    beam.set_polarization_normal((0.0, 1.0, 0.0))
    beam.set_polarization_fraction(polarization)
    return beam


def _write_atomically(cbf, path):
    """Write the CBF handle next to `path`, then move it into place: no half-written image is ever seen."""
    tmp = f"{path}.part"
    cbf.write_widefile(tmp.encode(), pycbf.CBF, pycbf.MIME_HEADERS | pycbf.MSG_DIGEST | pycbf.PAD_4K, 0)
    os.replace(tmp, path)


def write_cbf(path, detector, beam, pixels, integer=True, compress=True):
    """One full CBF (any number of panels), written atomically; `pixels` is a list of 2-D arrays."""
    writer = FullCBFWriter(imageset=_Models(detector, beam, str(path)))
    cbf = writer.get_cbf_handle(index=0, header_only=True)
    cbf.find_category(b"diffrn_data_frame")
    array_names = []
    for _ in range(cbf.count_rows()):
        cbf.find_column(b"array_id")
        array_names.append(cbf.get_value())
        cbf.next_row()
    kind = "signed 32-bit integer" if integer else "signed 64-bit real IEEE"
    cbf.add_category("array_structure", ["id", "encoding_type", "compression_type", "byte_order"])
    for name in array_names:
        cbf.add_row([name, kind, "packed" if compress else "none", "little_endian"])
    cbf.add_category("array_data", ["array_id", "binary_id", "data"])
    compression = pycbf.CBF_PACKED if compress else pycbf.CBF_NONE
    for i, (name, data) in enumerate(zip(array_names, pixels)):
        cbf.add_row([name, str(i + 1)])
        ns, nf = data.shape
        if integer:
            a = np.ascontiguousarray(np.rint(data), dtype="<i4")
            cbf.set_integerarray_wdims_fs(compression, i + 1, a.tobytes(), 4, 1, a.size, b"little_endian", nf, ns, 1, 0)
        else:
            a = np.ascontiguousarray(data, dtype="<f8")
            cbf.set_realarray_wdims_fs(compression, i + 1, a.tobytes(), 8, a.size, b"little_endian", nf, ns, 1, 0)
    _write_atomically(cbf, path)


_PILATUS_HEADER = """
# Detector: PILATUS {model}, S/N 60-0000
# 2026-01-01T00:00:00.000
# Pixel_size {pixel_m:g} m x {pixel_m:g} m
# Silicon sensor, thickness 0.000450 m
# Exposure_time 0.0100000 s
# Exposure_period 0.0100000 s
# Tau = 0 s
# Count_cutoff {cutoff} counts
# Threshold_setting: {threshold:.0f} eV
# Gain_setting: autog (vrf = 1.000)
# N_excluded_pixels = 0
# Excluded_pixels: badpix_mask.tif
# Flat_field: (nil)
# Trim_file: (nil)
# Image_path: /ramdisk/
# Wavelength {wavelength:.6f} A
# Detector_distance {distance_m:.7f} m
# Beam_xy ({beam_x:.3f}, {beam_y:.3f}) pixels
# Flux 0.000000
# Filter_transmission 1.0000
# Start_angle 0.0000 deg.
# Angle_increment 0.0000 deg.
# Polarization {polarization:.3f}
# Detector_2theta 0.0000 deg.
# Kappa 0.0000 deg.
# Phi 0.0000 deg.
"""


def write_minicbf(path, detector, beam, pixels, model="6M"):
    """One Pilatus miniCBF still (zero oscillation), written atomically; `pixels` is one 2-D array of counts.

    Byte-offset compressed, as a Pilatus writes it: dxtbx reads an uncompressed
    miniCBF only with a MIME `conversions` line that cbflib does not write.

    The header fixes the geometry to a flat detector normal to the beam (fast +x,
    slow -y), as the Pilatus header convention does; anything else is refused.
    """
    if len(detector) != 1:
        raise ValueError("a miniCBF holds one panel")
    panel = detector[0]
    fast, slow = panel.get_fast_axis(), panel.get_slow_axis()
    if max(abs(a - b) for a, b in zip(fast + slow, (1, 0, 0, 0, -1, 0))) > 1e-9:
        raise ValueError("a Pilatus miniCBF header describes a detector with fast +x, slow -y, normal to the beam")
    beam_x, beam_y = panel.get_beam_centre_px(beam.get_s0())
    header = _PILATUS_HEADER.format(
        model=model,
        pixel_m=panel.get_pixel_size()[0] / 1000.0,
        cutoff=int(panel.get_trusted_range()[1]),
        threshold=12398.4 / beam.get_wavelength() / 2,
        wavelength=beam.get_wavelength(),
        distance_m=panel.get_distance() / 1000.0,
        beam_x=beam_x,
        beam_y=beam_y,
        polarization=beam.get_polarization_fraction(),
    )
    cbf = cbf_wrapper()
    cbf.new_datablock(pathlib.Path(path).stem.encode())
    cbf.add_category("array_data", ["header_convention", "header_contents", "data"])
    cbf.add_row(["PILATUS_1.2", header])
    a = np.ascontiguousarray(np.rint(pixels), dtype="<i4")
    ns, nf = a.shape
    cbf.set_integerarray_wdims_fs(pycbf.CBF_BYTE_OFFSET, 1, a.tobytes(), 4, 1, a.size, b"little_endian", nf, ns, 1, 0)
    _write_atomically(cbf, path)
