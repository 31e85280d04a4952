"""Write simulated images as full imgCIF/CBF files that `dials.import` reads as stills.

dxtbx's FullCBFWriter builds the geometry header from dxtbx models; the pixel
arrays are added here (its own integer path passes a str byte order that
Debian's pycbf rejects).
"""

from __future__ import annotations

import os

import numpy as np
import pycbf
from dxtbx.format.cbf_writer import FullCBFWriter
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
    tmp = f"{path}.part"
    cbf.write_widefile(tmp.encode(), pycbf.CBF, pycbf.MIME_HEADERS | pycbf.MSG_DIGEST | pycbf.PAD_4K, 0)
    os.replace(tmp, path)
