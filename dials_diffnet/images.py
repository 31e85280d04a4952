"""dxtbx ImageSets -> per-panel float arrays, validity masks and geometry.

Everything that touches dxtbx image data goes through here, so any format
dxtbx reads (CBF, SMV, NeXus, multi-panel) reaches `representation.represent`
the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from dials_diffnet.representation import BeamGeometry, PanelGeometry, isolated_overloads


@dataclass
class ImageRef:
    """One image of an experiment list: where it is and which experiment owns it."""

    experiment_index: int
    identifier: str
    imageset: object
    index: int  # index into `imageset`
    path: str
    image_number: int  # 1-based frame number within the file list / sequence, as DIALS prints it


def panel_geometry(panel) -> PanelGeometry:
    return PanelGeometry(
        origin=tuple(panel.get_origin()),
        fast=tuple(panel.get_fast_axis()),
        slow=tuple(panel.get_slow_axis()),
        pixel_size=tuple(panel.get_pixel_size()),
        image_size=tuple(panel.get_image_size()),
    )


def detector_geometry(detector) -> tuple[PanelGeometry, ...]:
    return tuple(panel_geometry(p) for p in detector)


def beam_geometry(beam) -> BeamGeometry:
    s0 = np.asarray(beam.get_s0(), dtype=np.float64)
    return BeamGeometry(direction=tuple(s0 / np.linalg.norm(s0)), wavelength=float(beam.get_wavelength()))


def iter_image_refs(experiments):
    """Yield an ImageRef for every image, once, in experiment order.

    A rotation experiment owns every image of its sequence. A still whose
    one-image scan points into a shared ImageSequence owns the image its scan
    names. Stills sharing a plain ImageSet own one image each: the
    experiment's position among the experiments sharing it.
    """
    position_in_imageset: dict[int, int] = {}
    for i_expt, expt in enumerate(experiments):
        imageset = expt.imageset
        scan = expt.scan
        if scan is not None and scan.get_num_images() > 1:
            indices = range(len(imageset))
        elif len(imageset) == 1:
            indices = [0]
        elif scan is not None and hasattr(imageset, "get_array_range"):
            indices = [scan.get_array_range()[0] - imageset.get_array_range()[0]]
        else:
            key = id(imageset)
            position_in_imageset[key] = position_in_imageset.get(key, -1) + 1
            indices = [position_in_imageset[key]]
        for index in indices:
            yield ImageRef(
                experiment_index=i_expt,
                identifier=expt.identifier,
                imageset=imageset,
                index=index,
                path=imageset.get_path(index),
                image_number=_image_number(imageset, index),
            )


def _image_number(imageset, index):
    try:
        return int(imageset.indices()[index]) + 1
    except Exception:
        return index + 1


@dataclass
class RawImage:
    pixels: list  # per-panel counts (int32 from integer formats, else float32), overloads clipped to the trusted maximum
    valid: list  # per-panel bool arrays
    panels: tuple[PanelGeometry, ...]
    beam: BeamGeometry


def static_masks(imageset, detector) -> list:
    """Per-panel masks that do not depend on pixel values: the external mask and untrusted rectangles.

    dxtbx's ImageSet.get_mask also drops pixels at or above the trusted maximum;
    we keep those (clipped), because an overloaded Bragg spot is signal.
    """
    external = imageset.external_lookup.mask.data
    masks = []
    for i, panel in enumerate(detector):
        nf, ns = panel.get_image_size()
        ok = np.ones((ns, nf), dtype=bool)
        if not external.empty():
            ok &= external.tile(i).data().as_numpy_array().astype(bool)
        for f0, s0, f1, s1 in panel.get_mask():
            ok[s0:s1, f0:f1] = False
        masks.append(ok)
    return masks


def _raw_panels(imageset, index, detector) -> list:
    """The raw per-panel arrays of one image, as dxtbx's get_raw_data gives them."""
    if len(detector) == 1 and _plain_full_cbf(imageset):
        values = read_uncompressed_cbf(imageset.get_path(index), detector[0].get_image_size())
        if values is not None:
            return [values]
    raw = imageset.get_raw_data(index)
    if not isinstance(raw, tuple):
        raw = (raw,)
    return [data.as_numpy_array() for data in raw]


def _plain_full_cbf(imageset) -> bool:
    """True when the format reads a single-array full CBF with dxtbx's generic code (no beamline quirks)."""
    try:
        from dxtbx.format.FormatCBFFull import FormatCBFFull, FormatCBFFullStill

        reader = imageset.get_format_class().get_raw_data
    except Exception:
        return False
    return reader in (FormatCBFFull.get_raw_data, FormatCBFFullStill.get_raw_data)


_CBF_BINARY_START = b"\x0c\x1a\x04\xd5"
_CBF_ELEMENT_TYPES = {'"signed 32-bit integer"': "<i4", '"signed 64-bit real IEEE"': "<f8"}


def read_uncompressed_cbf(path, image_size):
    """The array of a single-array CBF stored without compression, read straight into numpy.

    cbflib copies an uncompressed array element by element (0.4 s for a 6M
    frame); the bytes are already the array. Returns None, so the caller falls
    back to dxtbx, for anything else: compressed, gzipped, other element types
    or dimensions that do not match the panel.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        start = head.find(_CBF_BINARY_START)
        if not head.startswith(b"###CBF") or start < 0 or head.count(b"--CIF-BINARY-FORMAT-SECTION--") != 1:
            return None
        mime = head[head.rfind(b"--CIF-BINARY-FORMAT-SECTION--", 0, start) : start].decode("ascii", "replace")
        fields = {}
        for line in mime.splitlines()[1:]:
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        content_type = fields.get("content-type", "").replace(" ", "")
        dtype = _CBF_ELEMENT_TYPES.get(fields.get("x-binary-element-type"))
        nf, ns = image_size
        if (
            content_type not in ("application/octet-stream", 'application/octet-stream;conversions="x-CBF_NONE"')
            or fields.get("content-transfer-encoding", "").upper() != "BINARY"
            or fields.get("x-binary-element-byte-order") != "LITTLE_ENDIAN"
            or dtype is None
            or fields.get("x-binary-size-fastest-dimension") != str(nf)
            or fields.get("x-binary-size-second-dimension") != str(ns)
            or fields.get("x-binary-size-third-dimension", "1") != "1"
            or fields.get("x-binary-size") != str(nf * ns * np.dtype(dtype).itemsize)
        ):
            return None
        f.seek(start + len(_CBF_BINARY_START))
        values = np.fromfile(f, dtype=dtype, count=nf * ns)
    if values.size != nf * ns:
        raise OSError(f"{path}: truncated CBF array ({values.size} of {nf * ns} values)")
    return values.astype(values.dtype.newbyteorder("="), copy=False).reshape(ns, nf)


_stderr_capture: dict = {}  # process id -> the file that takes fd 2 inside cbflib_quiet


@contextlib.contextmanager
def cbflib_quiet():
    """Keep CBFlib's complaints about a broken file off the terminal; pass on anything else written to stderr.

    CBFlib prints its parse errors straight to file descriptor 2, a few lines each time a format
    class tries a truncated CBF (a dozen for one file), while the image is flagged with its reason
    anyway. Meanwhile fd 2 goes to a file kept per process; lines not starting "CBFlib" are copied back.
    """
    pid = os.getpid()
    if pid not in _stderr_capture:  # a forked reader must not share its parent's file offset
        _stderr_capture.clear()
        _stderr_capture[pid] = tempfile.TemporaryFile(buffering=0)
    capture = _stderr_capture[pid].fileno()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    os.dup2(capture, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        size = os.lseek(capture, 0, os.SEEK_CUR)
        if size:
            os.lseek(capture, 0, os.SEEK_SET)
            text = os.read(capture, size)
            os.lseek(capture, 0, os.SEEK_SET)
            os.ftruncate(capture, 0)
            kept = [line for line in text.splitlines(keepends=True) if not line.startswith(b"CBFlib")]
            if kept:
                os.write(2, b"".join(kept))


def read_image(imageset, index) -> RawImage:
    """Read one image's raw panels: static masks applied, values at or below the trusted minimum
    and non-finite values invalid, overloads clipped to the trusted maximum, lone overloads (hot
    pixels, `representation.isolated_overloads`) invalid.

    Integer formats stay int32 (no per-pixel conversion: `represent` converts
    only the per-cell maxima, to the same bits).
    Raises whatever dxtbx raises for unreadable files: the caller turns that into
    a per-image failure flag.
    """
    detector = imageset.get_detector(index)
    beam = imageset.get_beam(index)
    pixels, valid = [], []
    for panel, values, mask in zip(detector, _raw_panels(imageset, index, detector), static_masks(imageset, detector)):
        lo, hi = panel.get_trusted_range()
        integer = values.dtype == np.int32 and float(hi).is_integer()
        overloaded = True  # float panels: isolated_overloads looks for itself
        if integer:
            ok = mask & (values > lo)
            top = values.max(initial=0)
            overloaded = top >= hi  # the usual integer panel has none: skip the hot-pixel search
            if top > hi:
                values = np.minimum(values, np.int32(min(hi, np.iinfo(np.int32).max)))
        else:
            values = values.astype(np.float32, copy=False)
            with np.errstate(invalid="ignore"):
                ok = mask & np.isfinite(values) & (values > lo)
            values = np.minimum(values, np.float32(hi))
        if overloaded:
            ok[isolated_overloads(values, ok, hi)] = False
        pixels.append(values)
        valid.append(ok)
    return RawImage(pixels=pixels, valid=valid, panels=detector_geometry(detector), beam=beam_geometry(beam))
