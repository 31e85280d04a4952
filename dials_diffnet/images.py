"""dxtbx ImageSets -> per-panel float arrays, validity masks and geometry.

Everything that touches dxtbx image data goes through here, so any format
dxtbx reads (CBF, SMV, NeXus, multi-panel) reaches `representation.represent`
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dials_diffnet.representation import BeamGeometry, PanelGeometry


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


def read_image(imageset, index) -> RawImage:
    """Read one image's raw panels: static masks applied, values at or below the trusted minimum
    and non-finite values invalid, overloads clipped to the trusted maximum.

    Integer formats stay int32 (no per-pixel conversion: `represent` converts
    only the per-cell maxima, to the same bits).
    Raises whatever dxtbx raises for unreadable files: the caller turns that into
    a per-image failure flag.
    """
    detector = imageset.get_detector(index)
    beam = imageset.get_beam(index)
    raw = imageset.get_raw_data(index)
    if not isinstance(raw, tuple):
        raw = (raw,)
    pixels, valid = [], []
    for panel, data, mask in zip(detector, raw, static_masks(imageset, detector)):
        values = data.as_numpy_array()
        lo, hi = panel.get_trusted_range()
        integer = values.dtype == np.int32 and float(hi).is_integer()
        if integer:
            ok = mask & (values > lo)
            if values.max(initial=0) > hi:
                values = np.minimum(values, np.int32(min(hi, np.iinfo(np.int32).max)))
        else:
            values = values.astype(np.float32, copy=False)
            with np.errstate(invalid="ignore"):
                ok = mask & np.isfinite(values) & (values > lo)
            values = np.minimum(values, np.float32(hi))
        pixels.append(values)
        valid.append(ok)
    return RawImage(pixels=pixels, valid=valid, panels=detector_geometry(detector), beam=beam_geometry(beam))
