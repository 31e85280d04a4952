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

An optional third plane (`planes=3`, crystal models from 0.9.0) is each cell's
signal-to-noise: how far the cell's brightest 3x3 box of pixels stands above the
cell's own background, in standard deviations of a 3x3 box mean. A weak spot
(integrated I/sigma ~5) peaks at only ~3 sigma in its brightest pixel, level with
the largest of the ~200 background pixels a cell holds, so the cell maximum loses
it; summed over its 3x3 box it stands out. Planes 0 and 1 do not depend on `planes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

REPRESENTATION_VERSION = 1
N_CHANNELS = 2  # planes every model reads: cell maximum, validity
PLANE_NAMES = ("log_max", "valid", "cell_snr")


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


def pixel_q(panel: PanelGeometry, beam: BeamGeometry, rows: slice = slice(None)):
    """Scattering vectors q = s1 - s0 (1/Angstrom) at every pixel centre, shape (n_slow, n_fast, 3),
    or for the slow-axis rows `rows` only (the same values as the whole panel's)."""
    nf, ns = panel.image_size
    f = (np.arange(nf, dtype=np.float64) + 0.5) * panel.pixel_size[0]
    s = (np.arange(ns, dtype=np.float64)[rows] + 0.5) * panel.pixel_size[1]
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

    All panels' pixels, flattened and concatenated, fall into runs of
    neighbours that share a cell (or share being outside the grid): `run_starts`
    marks where each run begins and `run_cells` is its cell (-1: outside). A
    cell's maximum is the maximum of its runs' maxima, so `represent` reads the
    pixels once in memory order and gathers only the ~100x fewer run maxima:
    `run_order` lists the inside runs sorted by cell, `starts` marks where
    each occupied cell begins in it, `cells` is that cell's flat index.
    """

    run_starts: np.ndarray
    run_cells: np.ndarray
    run_order: np.ndarray
    starts: np.ndarray
    cells: np.ndarray
    n_pixels: int
    panel_shapes: tuple
    grid: GridSpec


_ROWS_PER_BLOCK = 32


def build_grid_map(
    panels: tuple[PanelGeometry, ...], beam: BeamGeometry, grid: GridSpec = CRYSTAL_GRID
) -> GridMap:
    e1, e2 = _azimuth_frame(beam)
    flat_cells, shapes = [], []
    for panel in panels:
        nf, ns = panel.image_size
        shapes.append((ns, nf))
        # in blocks of rows that stay in cache: the same per-pixel arithmetic, twice as fast on 6M pixels
        for first in range(0, ns, _ROWS_PER_BLOCK):
            q = pixel_q(panel, beam, slice(first, first + _ROWS_PER_BLOCK))
            s = _length(q)
            # grid position: radius |q|, azimuth of q's projection perpendicular to the beam
            phi = np.arctan2(q @ e2, q @ e1)
            col = np.floor((s * np.cos(phi) + grid.s_max) / grid.cell).astype(np.int64)
            row = np.floor((grid.s_max - s * np.sin(phi)) / grid.cell).astype(np.int64)
            inside = (col >= 0) & (col < grid.size) & (row >= 0) & (row < grid.size)
            flat_cells.append(np.where(inside, row * grid.size + col, -1).ravel())
    cell_of_pixel = np.concatenate(flat_cells)
    run_starts = np.flatnonzero(np.r_[True, cell_of_pixel[1:] != cell_of_pixel[:-1]])
    run_cells = cell_of_pixel[run_starts]
    inside_runs = np.flatnonzero(run_cells >= 0)
    run_order = inside_runs[np.argsort(run_cells[inside_runs], kind="stable")]
    sorted_cells = run_cells[run_order]
    starts = np.flatnonzero(np.r_[sorted_cells.size > 0, sorted_cells[1:] != sorted_cells[:-1]])  # none: no pixel in reach
    return GridMap(
        run_starts=run_starts,
        run_cells=run_cells,
        run_order=run_order,
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


_INT32_MIN = np.iinfo(np.int32).min


def _masked_flat(pixels, valid) -> np.ndarray:
    """All panels' pixels in one flat array, invalid ones lowered below every valid value.

    Integer data stay integers (int32, invalid -> INT32_MIN): the max of integers
    converted afterwards equals the max of the converted values, since the
    conversion to float32 never reverses an order, so skipping the per-pixel
    conversion changes no output bit. Anything else (or a valid pixel AT
    INT32_MIN, which would read as invalid) becomes float32, invalid or
    non-finite -> -inf.
    """
    as_int = all(p.dtype.kind in "iu" and np.can_cast(p.dtype, np.int32) for p in pixels) and not any(
        p.dtype == np.int32 and p.size and p.min() == _INT32_MIN for p in pixels
    )
    dtype, lowest = (np.int32, _INT32_MIN) if as_int else (np.float32, -np.inf)
    flat = np.empty(sum(p.size for p in pixels), dtype=dtype)
    start = 0
    for p, v in zip(pixels, valid):
        part = flat[start : start + p.size].reshape(p.shape)
        with np.errstate(over="ignore"):  # beyond float32's range is inf: invalid, as documented
            part[...] = p
        # a plain copy, then the invalid pixels lowered: fewer passes than a masked copy into a filled array
        np.copyto(part, lowest, where=~v if as_int else ~(v & np.isfinite(part)))
        start += p.size
    return flat


# A saturated Bragg spot spreads over neighbouring pixels (its profile is at least a pixel wide,
# so a neighbour of an overloaded peak holds well over a tenth of it); a lone overload is a hot pixel.
HOT_PIXEL_NEIGHBOUR_FRACTION = 0.1


def isolated_overloads(values: np.ndarray, valid: np.ndarray, trusted_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of one panel's hot pixels: valid pixels at or above `trusted_max` whose valid
    8-neighbours all stay below HOT_PIXEL_NEIGHBOUR_FRACTION of it.

    Every reader (dxtbx images in `images.read_image`, simulated ones in `simulate.stills.render`)
    marks these invalid before `represent`: under the per-cell maximum a hot pixel is otherwise
    indistinguishable from a spot, and the hundreds on a large detector read as a hit.
    """
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # one pass (row maxima), then only the few rows holding an overload are searched
    overloaded_rows = np.flatnonzero(values.max(axis=1) >= trusted_max)
    in_row, cols = np.nonzero(values[overloaded_rows] >= trusted_max)
    rows = overloaded_rows[in_row]
    keep = valid[rows, cols]
    rows, cols = rows[keep], cols[keep]
    n_rows, n_cols = values.shape
    neighbour_max = np.full(rows.size, -np.inf)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == dc == 0:
                continue
            r, c = rows + dr, cols + dc
            inside = (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
            r, c = np.clip(r, 0, n_rows - 1), np.clip(c, 0, n_cols - 1)
            seen = inside & valid[r, c]
            neighbour_max = np.where(seen, np.maximum(neighbour_max, values[r, c]), neighbour_max)
    lone = neighbour_max < HOT_PIXEL_NEIGHBOUR_FRACTION * trusted_max
    return rows[lone], cols[lone]


def _box3(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """3x3 box sums of a 2-D array (zero beyond its edges) into `out`: two shifted adds per axis."""
    rows = np.empty_like(out)
    np.add(a[:, :-1], a[:, 1:], out=rows[:, 1:])
    rows[:, 0] = a[:, 0]
    rows[:, :-1] += a[:, 1:]
    np.add(rows[:-1], rows[1:], out=out[1:])
    out[0] = rows[0]
    out[:-1] += rows[1:]
    return out


def _per_cell(values: np.ndarray, ufunc, grid_map: GridMap, run_dtype=None, cell_dtype=None) -> np.ndarray:
    """ufunc-reduction of flat per-pixel values per occupied cell (grid_map.cells order): over each
    run in `run_dtype` (a run holds at most one cell's pixels: float32 sums of them stay well within
    the plane's precision and take half float64's time), then over each cell's runs in `cell_dtype`."""
    per_run = ufunc.reduceat(values, grid_map.run_starts, dtype=run_dtype)
    return ufunc.reduceat(per_run[grid_map.run_order], grid_map.starts, dtype=cell_dtype)


# Floors on a cell's background variance (photons^2): at least Poisson's (= the mean), and never
# zero, so that an empty cell of a noiseless detector does not divide by nothing.
MIN_VARIANCE = 0.1


def cell_snr(pixels, valid, grid_map: GridMap) -> np.ndarray:
    """Per occupied cell (grid_map.cells order): z-score of the cell's brightest 3x3 box mean.

    Over the cell's valid pixels: background mean m and variance v (v >= m, MIN_VARIANCE);
    b = the largest mean of the valid pixels in a 3x3 box centred on a valid pixel of the cell.
    A 3x3 mean of background has standard deviation sqrt(v)/3, so the score is 3 (b - m) / sqrt(v).
    Cells without a valid pixel score -inf.
    """
    values = np.empty(grid_map.n_pixels, np.float32)  # valid values, 0 elsewhere
    box_mean = np.empty(grid_map.n_pixels, np.float32)  # -inf on invalid pixels
    valid_flat = np.empty(grid_map.n_pixels, np.uint8)
    start = 0
    for p, v in zip(pixels, valid):
        part = slice(start, start + p.size)
        x = values[part].reshape(p.shape)
        if p.dtype.kind in "iu":
            np.multiply(p, v, out=x, casting="unsafe")
        else:  # as in `represent`, values not finite in float32 are invalid (and inf * 0 would be NaN)
            with np.errstate(over="ignore", invalid="ignore"):
                np.copyto(x, p, casting="unsafe")
            v = v & np.isfinite(x)
            np.copyto(x, 0, where=~v)
        box_sum = _box3(x, np.empty(p.shape, np.float32))
        box_count = _box3(v.view(np.uint8), np.empty(p.shape, np.uint8))
        b = box_mean[part].reshape(p.shape)
        with np.errstate(divide="ignore", invalid="ignore"):  # count 0 only around invalid pixels, masked next
            np.divide(box_sum, box_count, out=b)
        np.copyto(b, -np.inf, where=~v)  # faster than divide(where=) into a filled array
        valid_flat[part] = v.ravel()
        start += p.size
    # valid pixels per run from a running count (exact, and faster than an add-reduction of uint8)
    running = np.cumsum(valid_flat, dtype=np.int32)  # < 2**31 pixels on any detector
    per_run = np.diff(running[np.r_[grid_map.run_starts[1:], grid_map.n_pixels] - 1], prepend=0)
    n = np.add.reduceat(per_run[grid_map.run_order], grid_map.starts)
    total = _per_cell(values, np.add, grid_map, np.float32, np.float64)
    total_sq = _per_cell(np.square(values, out=values), np.add, grid_map, np.float32, np.float64)
    best = _per_cell(box_mean, np.maximum, grid_map)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        variance = np.maximum(np.maximum(total_sq / n - mean * mean, mean), MIN_VARIANCE)
        return np.where(n > 0, 3.0 * (best - mean) / np.sqrt(variance), -np.inf)


def represent(pixels, valid, grid_map: GridMap, planes: int = N_CHANNELS) -> np.ndarray:
    """Image -> network input, float32 array (planes, size, size) for grid_map.grid.

    pixels: list of per-panel 2-D arrays (counts, any dtype), in the panel order of `grid_map`.
    valid: list of per-panel boolean arrays, True where the pixel is trusted.
    Overloaded pixels should be passed clipped to the trusted maximum and valid:
    a saturated Bragg spot is still signal.
    planes: 2 (cell maximum, validity) or 3 (and the cell signal-to-noise plane, `cell_snr`).
    """
    if planes not in (N_CHANNELS, len(PLANE_NAMES)):
        raise ValueError(f"planes={planes}: the representation has {N_CHANNELS} or {len(PLANE_NAMES)} planes")
    pixels = [np.asarray(p) for p in pixels]
    valid = [np.asarray(v, dtype=bool) for v in valid]
    n_pixels = sum(p.size for p in pixels)
    if n_pixels != grid_map.n_pixels:
        raise ValueError(f"image has {n_pixels} pixels but its geometry has {grid_map.n_pixels}")
    flat = _masked_flat(pixels, valid)
    # max per run of neighbours in memory order, then per cell over its runs: one sequential pass over the pixels
    run_max = np.maximum.reduceat(flat, grid_map.run_starts)
    cell_max = np.maximum.reduceat(run_max[grid_map.run_order], grid_map.starts)
    seen = cell_max > (_INT32_MIN if flat.dtype == np.int32 else -np.inf)

    size = grid_map.grid.size
    out = np.zeros((planes, size * size), dtype=np.float32)
    cells = grid_map.cells[seen]
    out[0, cells] = _minus_median(np.log1p(np.maximum(cell_max[seen].astype(np.float32), 0.0)))
    out[1, cells] = 1.0
    if planes == 3:
        snr = cell_snr(pixels, valid, grid_map)[seen]
        out[2, cells] = _minus_median(np.log1p(np.maximum(snr, 0.0)).astype(np.float32))
    return out.reshape(planes, size, size)


def _minus_median(level: np.ndarray) -> np.ndarray:
    """The typical cell at 0, whatever the detector's gain or the exposure."""
    if level.size:
        level -= np.median(level)
    return level


def valid_fraction(x: np.ndarray) -> float:
    return float(x[1].mean())
