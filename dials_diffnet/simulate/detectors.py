"""Detector models for the simulator: real module layouts, pixel sizes, noise models.

Lab frame as in dxtbx: the beam travels along -z, the sample is at the origin,
a flat detector normal to the beam sits at z = -distance with its fast axis
along +x and slow axis along -y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dials_diffnet.representation import PanelGeometry


@dataclass(frozen=True)
class DetectorModel:
    name: str
    pixel_size: float  # mm
    # One panel per entry: (n_fast, n_slow, centre offset (x, y) mm in the detector plane, in-plane rotation deg)
    panels: tuple
    # Gaps between modules inside a panel, as masked rows/columns: (module size, gap) along fast and slow
    modules: tuple | None
    counting: bool  # photon counting (Poisson only) or integrating (gain, readout noise)
    trusted_range: tuple[float, float]
    distance_range: tuple[float, float]  # mm, training range for this model
    dead_value: float  # value written in gaps and dead pixels (below trusted_range[0] when masked)

    @property
    def n_pixels(self):
        return sum(nf * ns for nf, ns, _, _ in self.panels)


def _modular(name, n_mod_f, n_mod_s, mod_f, mod_s, gap_f, gap_s, pixel, distance_range):
    nf = n_mod_f * mod_f + (n_mod_f - 1) * gap_f
    ns = n_mod_s * mod_s + (n_mod_s - 1) * gap_s
    return DetectorModel(
        name=name,
        pixel_size=pixel,
        panels=((nf, ns, (0.0, 0.0), 0.0),),
        modules=((mod_f, gap_f), (mod_s, gap_s)),
        counting=True,
        trusted_range=(-1.0, 1e6),
        distance_range=distance_range,
        dead_value=-2.0,
    )


def _cspad():
    """64 ASICs of 194 x 185 pixels (110 um): 4 quadrants of four 2x2 blocks of ASIC pairs, pinwheel-rotated."""
    px = 0.10992
    w_pair = (2 * 194 + 3) * px  # two ASICs side by side along fast, 3-pixel gap
    h = 185 * px
    panels = []
    for quadrant in range(4):
        angle = 90.0 * quadrant
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        for block, vertical in enumerate((False, True, True, False)):
            bx = 2.0 + (block % 2) * (w_pair + 1.0) + w_pair / 2
            by = 2.0 + (block // 2) * (w_pair + 1.0) + w_pair / 2
            for pair in range(2):
                off = (pair - 0.5) * (h + 0.8)
                for asic in range(2):
                    along = (asic - 0.5) * (194 + 3) * px
                    x, y = (bx + along, by + off) if not vertical else (bx + off, by + along)
                    rot = angle + (90.0 if vertical else 0.0)
                    panels.append((194, 185, (c * x - s * y, s * x + c * y), rot))
    return DetectorModel(
        name="cspad",
        pixel_size=px,
        panels=tuple(panels),
        modules=None,
        counting=False,
        trusted_range=(-10.0, 30000.0),
        distance_range=(90.0, 180.0),
        dead_value=-20.0,
    )


def _jungfrau4m():
    """8 modules of 1024 x 512 (75 um), 2 columns x 4 rows, ~2 mm gaps; integrating, calibrated to photons."""
    px = 0.075
    panels = []
    for row in range(4):
        for col in range(2):
            x = (col - 0.5) * (1024 * px + 2.0)
            y = (1.5 - row) * (512 * px + 2.5)
            panels.append((1024, 512, (x, y), 0.0))
    return DetectorModel(
        name="jungfrau4m",
        pixel_size=px,
        panels=tuple(panels),
        modules=((256, 0), (256, 0)),
        counting=False,
        trusted_range=(-5.0, 12000.0),
        distance_range=(80.0, 250.0),
        dead_value=-10.0,
    )


DETECTORS = {
    d.name: d
    for d in (
        _modular("pilatus6m", 5, 12, 487, 195, 7, 17, 0.172, (120.0, 500.0)),
        _modular("pilatus2m", 3, 8, 487, 195, 7, 17, 0.172, (80.0, 350.0)),
        _modular("eiger16m", 4, 8, 1030, 514, 10, 37, 0.075, (100.0, 500.0)),
        _modular("eiger4m", 2, 4, 1030, 514, 10, 37, 0.075, (80.0, 300.0)),
        DetectorModel(
            name="rayonix340",  # MX340-like CCD read out 4x4 binned
            pixel_size=0.177,
            panels=((1920, 1920, (0.0, 0.0), 0.0),),
            modules=None,
            counting=False,
            trusted_range=(0.0, 65535.0),
            distance_range=(120.0, 500.0),
            dead_value=0.0,
        ),
        _cspad(),
        _jungfrau4m(),
    )
}


def panel_geometries(model: DetectorModel, distance: float, beam_xy: tuple[float, float]):
    """PanelGeometry per panel; beam_xy (mm) is where the beam hits, relative to the detector centre."""
    out = []
    for nf, ns, (cx, cy), rot in model.panels:
        c, s = np.cos(np.radians(rot)), np.sin(np.radians(rot))
        fast = np.array([c, s, 0.0])
        slow = np.array([s, -c, 0.0])  # rot=0: slow along -y
        centre = np.array([cx - beam_xy[0], cy - beam_xy[1], -distance])
        origin = centre - fast * nf * model.pixel_size / 2 - slow * ns * model.pixel_size / 2
        out.append(
            PanelGeometry(
                origin=tuple(float(v) for v in origin),
                fast=tuple(float(v) for v in fast),
                slow=tuple(float(v) for v in slow),
                pixel_size=(model.pixel_size, model.pixel_size),
                image_size=(nf, ns),
            )
        )
    return tuple(out)


def module_gap_mask(model: DetectorModel, panel_index: int) -> np.ndarray:
    """True where the panel has a sensitive pixel (False in inter-module gaps)."""
    nf, ns, _, _ = model.panels[panel_index]
    ok = np.ones((ns, nf), dtype=bool)
    if model.modules:
        (mod_f, gap_f), (mod_s, gap_s) = model.modules
        if gap_f:
            ok[:, (np.arange(nf) % (mod_f + gap_f)) >= mod_f] = False
        if gap_s:
            ok[(np.arange(ns) % (mod_s + gap_s)) >= mod_s, :] = False
    return ok


def to_dxtbx(model: DetectorModel, panels: tuple[PanelGeometry, ...]):
    """A dxtbx Detector for writing image files that `dials.import` reads back."""
    from dxtbx.model import Detector

    detector = Detector()
    for i, pg in enumerate(panels):
        p = detector.add_panel()
        p.set_name(f"{model.name}_{i}")
        p.set_type("SENSOR_PAD" if model.counting else "SENSOR_CCD")
        p.set_image_size(pg.image_size)
        p.set_pixel_size(pg.pixel_size)
        p.set_trusted_range(model.trusted_range)
        p.set_frame(pg.fast, pg.slow, pg.origin)
    return detector


def writes_integers(model: DetectorModel) -> bool:
    """Photon counters and the Rayonix CCD store integer counts; the integrating pixel detectors calibrated floats."""
    return model.counting or model.name == "rayonix340"


def pilatus_model(detector_name: str) -> str | None:
    """The Pilatus model a miniCBF header names for one of our detector models ("6M"), or None."""
    return detector_name.removeprefix("pilatus").upper() if detector_name.startswith("pilatus") else None
