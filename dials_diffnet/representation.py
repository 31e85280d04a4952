"""The ONE function that turns a diffraction image into network input.

Training, evaluation and inference all call `represent()`; nothing else may
build network input. Every image, whatever the detector, distance, wavelength
or beam centre, is resampled onto a fixed grid in reciprocal space: cell (row,
col) covers the scattering vector q = s1 - s0 whose length |q| = 1/d is the
distance from the grid centre and whose azimuth (about the beam) is the angle.
Each cell keeps the MAX of the pixels that fall in it, so Bragg spots survive
the down-sampling; a second channel says which cells saw any valid pixel
(gaps, beamstop, masked pixels and everything beyond the detector edge are 0).

Channel 0 is log1p(counts) minus the median over valid cells, so the typical
background sits at 0 whatever the detector gain or exposure; invalid cells are 0.
A resolution target is then geometry-free: the radius of a ring in this grid.
The crystallography and SPI grids differ only in reach (GridSpec).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

REPRESENTATION_VERSION = 1
N_CHANNELS = 2


@dataclass(frozen=True)
class GridSpec:
    """Size and reach of the reciprocal-space grid; `s_max` is |q| (1/Angstrom) at the grid's inner edge."""

    size: int
    s_max: float

    @property
    def cell(self) -> float:
        """Cell width in 1/Angstrom."""
        return 2.0 * self.s_max / self.size


# Crystallography: out to d = 1.25 A. SPI uses the same function on a small-angle grid.
CRYSTAL_GRID = GridSpec(size=256, s_max=0.8)


@dataclass(frozen=True)
class PanelGeometry:
    """One detector panel in the laboratory frame (mm), as dxtbx describes it."""

    origin: tuple[float, float, float]  # lab position of the first pixel's corner
    fast: tuple[float, float, float]  # unit vector along increasing fast index
    slow: tuple[float, float, float]  # unit vector along increasing slow index
    pixel_size: tuple[float, float]  # (fast, slow) mm
    image_size: tuple[int, int]  # (n_fast, n_slow)


@dataclass(frozen=True)
class BeamGeometry:
    direction: tuple[float, float, float]  # unit vector along the beam (dxtbx s0 direction)
    wavelength: float  # Angstrom


def _length(v: np.ndarray) -> np.ndarray:
    """|v| over the last axis (of 3): the same bits as np.linalg.norm(v, axis=-1), several times faster."""
    return np.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2])


def pixel_q(panel: PanelGeometry, beam: BeamGeometry):
    """Scattering vectors q = s1 - s0 (1/Angstrom) at every pixel centre, shape (n_slow, n_fast, 3)."""
    nf, ns = panel.image_size
    f = (np.arange(nf, dtype=np.float64) + 0.5) * panel.pixel_size[0]
    s = (np.arange(ns, dtype=np.float64) + 0.5) * panel.pixel_size[1]
    xyz = (
        np.asarray(panel.origin)[None, None, :]
        + s[:, None, None] * np.asarray(panel.slow)[None, None, :]
        + f[None, :, None] * np.asarray(panel.fast)[None, None, :]
    )
    unit_s1 = xyz / _length(xyz)[..., None]
    unit_s0 = np.asarray(beam.direction, dtype=np.float64)
    unit_s0 = unit_s0 / np.linalg.norm(unit_s0)
    return (unit_s1 - unit_s0) / beam.wavelength


def _azimuth_frame(beam: BeamGeometry):
    """Two unit vectors perpendicular to the beam: lab x (or y) projected, then their cross."""
    b = np.asarray(beam.direction, dtype=np.float64)
    b = b / np.linalg.norm(b)
    ref = np.array([1.0, 0.0, 0.0]) if abs(b[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = ref - b * ref.dot(b)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(b, e1)


@dataclass
class GridMap:
    """Precomputed pixel -> grid-cell assignment for one detector + beam geometry.

    `order` picks, from all panels' pixels flattened and concatenated, those
    that land inside the grid, sorted by cell; `starts` marks where each
    occupied cell's run begins, `cells` is that cell's flat index.
    """

    order: np.ndarray
    starts: np.ndarray
    cells: np.ndarray
    n_pixels: int
    panel_shapes: tuple
    grid: GridSpec


def build_grid_map(
    panels: tuple[PanelGeometry, ...], beam: BeamGeometry, grid: GridSpec = CRYSTAL_GRID
) -> GridMap:
    e1, e2 = _azimuth_frame(beam)
    flat_cells, shapes = [], []
    for panel in panels:
        q = pixel_q(panel, beam)
        shapes.append(q.shape[:2])
        s = _length(q)
        # grid position: radius |q|, azimuth of q's projection perpendicular to the beam
        phi = np.arctan2(q @ e2, q @ e1)
        col = np.floor((s * np.cos(phi) + grid.s_max) / grid.cell).astype(np.int64)
        row = np.floor((grid.s_max - s * np.sin(phi)) / grid.cell).astype(np.int64)
        inside = (col >= 0) & (col < grid.size) & (row >= 0) & (row < grid.size)
        flat_cells.append(np.where(inside, row * grid.size + col, -1).ravel())
    cell_of_pixel = np.concatenate(flat_cells)
    inside = np.flatnonzero(cell_of_pixel >= 0)
    # a stable sort of 16-bit keys is a radix sort in numpy: linear in the pixel count
    keys = cell_of_pixel[inside]
    keys = keys.astype(np.uint16) if grid.size**2 <= 1 << 16 else keys
    order = inside[np.argsort(keys, kind="stable")]
    sorted_cells = cell_of_pixel[order]
    starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
    return GridMap(
        order=order,
        starts=starts,
        cells=sorted_cells[starts],
        n_pixels=cell_of_pixel.size,
        panel_shapes=tuple(shapes),
        grid=grid,
    )


@lru_cache(maxsize=16)
def cached_grid_map(
    panels: tuple[PanelGeometry, ...], beam: BeamGeometry, grid: GridSpec = CRYSTAL_GRID
) -> GridMap:
    """Grid maps are expensive (seconds for 6M pixels) and shared by every image of a geometry."""
    return build_grid_map(panels, beam, grid)


def represent(pixels, valid, grid_map: GridMap) -> np.ndarray:
    """Image -> network input, float32 array (N_CHANNELS, size, size) for grid_map.grid.

    pixels: list of per-panel 2-D arrays (counts, any dtype), in the panel order of `grid_map`.
    valid: list of per-panel boolean arrays, True where the pixel is trusted.
    Overloaded pixels should be passed clipped to the trusted maximum and valid:
    a saturated Bragg spot is still signal.
    """
    values = np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in pixels])
    ok = np.concatenate([np.asarray(v, dtype=bool).ravel() for v in valid])
    if values.size != grid_map.n_pixels:
        raise ValueError(
            f"image has {values.size} pixels but its geometry has {grid_map.n_pixels}"
        )
    ok &= np.isfinite(values)
    picked = values[grid_map.order]
    picked_ok = ok[grid_map.order]
    picked[~picked_ok] = -np.inf
    cell_max = np.maximum.reduceat(picked, grid_map.starts)
    seen = np.isfinite(cell_max)

    size = grid_map.grid.size
    out = np.zeros((N_CHANNELS, size * size), dtype=np.float32)
    cells = grid_map.cells[seen]
    level = np.log1p(np.maximum(cell_max[seen], 0.0))
    if level.size:
        level -= np.median(level)
    out[0, cells] = level
    out[1, cells] = 1.0
    return out.reshape(N_CHANNELS, size, size)


def valid_fraction(x: np.ndarray) -> float:
    return float(x[1].mean())
