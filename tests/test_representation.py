import numpy as np
import pytest

from dials_diffnet.representation import (
    CRYSTAL_GRID,
    BeamGeometry,
    GridSpec,
    PanelGeometry,
    build_grid_map,
    cell_snr,
    isolated_overloads,
    represent,
)


def flat_detector(distance=200.0, n=400, pixel=0.172, beam_centre=(200.0, 200.0)):
    """One square panel normal to the beam along -z, dxtbx-style."""
    origin = (-beam_centre[0] * pixel, beam_centre[1] * pixel, -distance)
    return (PanelGeometry(origin, (1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (pixel, pixel), (n, n)),)


BEAM = BeamGeometry(direction=(0.0, 0.0, -1.0), wavelength=1.0)


def test_spot_lands_at_its_resolution_radius():
    panels = flat_detector()
    gm = build_grid_map(panels, BEAM)
    img = np.zeros((400, 400), np.float32)
    img[200, 350] = 1000.0  # 150 px right of the beam centre
    x = represent([img], [np.ones_like(img, bool)], gm)
    row, col = np.unravel_index(np.argmax(x[0]), x[0].shape)
    centre = CRYSTAL_GRID.size / 2
    radius_s = np.hypot(row + 0.5 - centre, col + 0.5 - centre) * CRYSTAL_GRID.cell
    two_theta = np.arctan2(150.5 * 0.172, 200.0)
    expected_s = 2 * np.sin(two_theta / 2) / 1.0
    assert abs(radius_s - expected_s) < 1.5 * CRYSTAL_GRID.cell


def test_geometry_free_same_d_same_cell():
    """A spot at the same d seen at two distances/wavelengths lands in the same grid cell."""
    cells = []
    for distance, wavelength in [(150.0, 1.0), (300.0, 0.8)]:
        beam = BeamGeometry((0.0, 0.0, -1.0), wavelength)
        panels = flat_detector(distance=distance, n=800, beam_centre=(400.0, 400.0))
        gm = build_grid_map(panels, beam)
        d = 6.0
        two_theta = 2 * np.arcsin(wavelength / (2 * d))
        px = int(round(distance * np.tan(two_theta) / 0.172 + 400 - 0.5))
        img = np.zeros((800, 800), np.float32)
        img[400, px] = 500.0
        x = represent([img], [np.ones_like(img, bool)], gm)
        cells.append(np.unravel_index(np.argmax(x[0]), x[0].shape))
    assert abs(cells[0][0] - cells[1][0]) <= 1 and abs(cells[0][1] - cells[1][1]) <= 1


def test_masked_pixels_and_max_pooling():
    panels = flat_detector()
    gm = build_grid_map(panels, BEAM)
    img = np.full((400, 400), 10.0, np.float32)
    valid = np.ones_like(img, bool)
    valid[:, :200] = False  # left half masked
    img[:, :200] = 1e6  # masked values must not leak
    x = represent([img], [valid], gm)
    assert x[0].max() == 0.0  # uniform background -> median-subtracted zero everywhere valid
    centre = CRYSTAL_GRID.size // 2
    assert x[1][centre, : centre - 5].sum() == 0  # left of the beam: no valid cells
    assert x[1][centre, centre + 5 : centre + 20].all()


def test_blank_and_nonfinite_image_gives_finite_output():
    panels = flat_detector()
    gm = build_grid_map(panels, BEAM)
    img = np.full((400, 400), np.nan, np.float32)
    x = represent([img], [np.ones_like(img, bool)], gm)
    assert np.isfinite(x).all() and x[1].sum() == 0


def test_grid_spec_reach():
    small = GridSpec(size=64, s_max=0.02)
    gm = build_grid_map(flat_detector(distance=2000.0), BEAM, small)
    x = represent([np.ones((400, 400), np.float32)], [np.ones((400, 400), bool)], gm)
    assert x.shape == (2, 64, 64) and x[1].mean() > 0.5


def _reference_represent(pixels, valid, grid_map):
    """The plain statement of represent(): float32 values, invalid or non-finite -> -inf, max per cell
    over each pixel's cell. The fast version must give the same bits (the training shards were made
    with this arithmetic, pixel by pixel)."""
    with np.errstate(over="ignore"):
        values = np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in pixels])
    ok = np.concatenate([np.asarray(v, dtype=bool).ravel() for v in valid]) & np.isfinite(values)
    cell_of_pixel = np.repeat(grid_map.run_cells, np.diff(np.r_[grid_map.run_starts, grid_map.n_pixels]))
    size2 = grid_map.grid.size**2
    cell_max = np.full(size2, -np.inf, np.float32)
    inside = cell_of_pixel >= 0
    np.maximum.at(cell_max, cell_of_pixel[inside], np.where(ok, values, -np.inf).astype(np.float32)[inside])
    seen = np.isfinite(cell_max)
    out = np.zeros((2, size2), np.float32)
    level = np.log1p(np.maximum(cell_max[seen], 0.0))
    if level.size:
        level -= np.median(level)
    out[0, seen] = level
    out[1, seen] = 1.0
    return out.reshape(2, grid_map.grid.size, grid_map.grid.size)


def test_fast_represent_is_bit_identical_to_the_plain_arithmetic():
    two_panels = flat_detector(n=300) + flat_detector(distance=150.0, n=300, beam_centre=(-20.0, 150.0))
    gm = build_grid_map(two_panels, BEAM)
    rng = np.random.default_rng(0)
    shape = (300, 300)
    for dtype in (np.int32, np.uint16, np.int16, np.float32, np.float64, np.uint32):
        pixels = []
        for _ in two_panels:
            p = rng.poisson(3.0, size=shape).astype(np.float64)
            p[rng.random(shape) < 0.01] = rng.integers(100, 70000, size=1)[0]  # spots, some beyond uint16
            p[rng.random(shape) < 0.01] = -2  # dead pixels
            if np.dtype(dtype).kind == "f":
                p[rng.random(shape) < 0.001] = np.nan
                p[rng.random(shape) < 0.001] = np.inf
                p[0, 0] = 1e39  # finite in float64, inf in float32: invalid as in the plain version
            info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
            pixels.append(np.clip(p, info.min, info.max).astype(dtype) if info else p.astype(dtype))
        valid = [rng.random(shape) > 0.05 for _ in two_panels]
        assert np.array_equal(represent(pixels, valid, gm), _reference_represent(pixels, valid, gm)), dtype
    # a valid int32 pixel at the lowest int32 (what invalid pixels are lowered to) takes the float path, still seen
    pixels[0] = pixels[0].astype(np.int32)
    pixels[0][150, 150] = np.iinfo(np.int32).min
    valid[0][150, 150] = True
    assert np.array_equal(represent(pixels, valid, gm), _reference_represent(pixels, valid, gm))


def test_lone_overloads_are_hot_pixels_but_a_saturated_spot_is_not():
    hi = 1000.0
    img = np.full((40, 40), 3.0, np.float32)
    valid = np.ones_like(img, bool)
    img[5, 5] = hi  # hot pixel on background
    img[0, 39] = hi  # hot pixel in a corner
    img[30, 10] = hi  # hot pixel whose only bright neighbour is masked
    img[30, 11], valid[30, 11] = hi, False
    yy, xx = np.mgrid[:40, :40]
    img += 3 * hi * np.exp(-0.5 * ((yy - 20) ** 2 + (xx - 20.3) ** 2) / 0.6**2)  # a spot 0.6 px wide
    img = np.minimum(img, hi)
    hot = set(zip(*isolated_overloads(img, valid, hi)))
    assert img[20, 20] == hi and (20, 20) not in hot  # the saturated spot's peak stays signal
    assert hot == {(5, 5), (0, 39), (30, 10)}
    assert isolated_overloads(img, valid, 2 * hi)[0].size == 0  # nothing overloaded, nothing flagged


def _reference_cell_snr(pixels, valid, grid_map):
    """cell_snr() stated plainly in float64: each pixel's 3x3 box mean over the valid pixels of its
    panel, then per cell the valid pixels' mean and variance and the best box mean."""
    values, box_means, oks = [], [], []
    for p, v in zip(pixels, valid):
        with np.errstate(over="ignore"):
            x = np.asarray(p, dtype=np.float32).astype(np.float64)
        ok = np.asarray(v, bool) & np.isfinite(x)
        x = np.where(ok, x, 0.0)
        padded_x, padded_ok = np.pad(x, 1), np.pad(ok, 1).astype(np.float64)
        n_rows, n_cols = x.shape
        box_sum = sum(padded_x[1 + dr : 1 + dr + n_rows, 1 + dc : 1 + dc + n_cols] for dr in (-1, 0, 1) for dc in (-1, 0, 1))
        box_n = sum(padded_ok[1 + dr : 1 + dr + n_rows, 1 + dc : 1 + dc + n_cols] for dr in (-1, 0, 1) for dc in (-1, 0, 1))
        values.append(x.ravel())
        oks.append(ok.ravel())
        box_means.append(np.where(ok, box_sum / np.maximum(box_n, 1), -np.inf).ravel())
    x, ok, b = np.concatenate(values), np.concatenate(oks), np.concatenate(box_means)
    cell_of_pixel = np.repeat(grid_map.run_cells, np.diff(np.r_[grid_map.run_starts, grid_map.n_pixels]))
    out = []
    for cell in grid_map.cells:
        mine = (cell_of_pixel == cell) & ok
        if not mine.any():
            out.append(-np.inf)
            continue
        m, var = x[mine].mean(), x[mine].var()
        out.append(3 * (b[mine].max() - m) / np.sqrt(max(var, m, 0.1)))
    return np.array(out)


def test_cell_snr_is_the_plain_statement_for_every_pixel_type():
    two_panels = flat_detector(distance=900.0, n=120) + flat_detector(distance=700.0, n=120, beam_centre=(-20.0, 60.0))
    gm = build_grid_map(two_panels, BEAM, GridSpec(size=32, s_max=0.1))
    rng = np.random.default_rng(3)
    shape = (120, 120)
    for dtype in (np.int32, np.uint16, np.float32, np.float64):
        pixels = []
        for _ in two_panels:
            p = rng.poisson(5.0, size=shape).astype(np.float64)
            p[rng.random(shape) < 0.005] += 300  # spots
            if np.dtype(dtype).kind == "f":
                p[rng.random(shape) < 0.002] = np.nan
                p[0, 1] = 1e39  # finite in float64, inf in float32: invalid, as in represent
            pixels.append(p.astype(dtype))
        valid = [rng.random(shape) > 0.05 for _ in two_panels]
        valid[0][:, 40:45] = False  # a gap: box means beside it average fewer pixels
        np.testing.assert_allclose(cell_snr(pixels, valid, gm), _reference_cell_snr(pixels, valid, gm), rtol=1e-5, atol=1e-5)
        x2, x3 = represent(pixels, valid, gm), represent(pixels, valid, gm, planes=3)
        assert np.array_equal(x3[:2], x2)  # the first two planes do not depend on the third
        assert np.isfinite(x3).all() and not x3[2][x3[1] == 0].any()


def test_snr_plane_finds_a_weak_spot_the_cell_maximum_loses():
    """A 3x3 spot 8 photons a pixel above a Poisson(10) background: its brightest pixel is no
    brighter than the background's brightest, but its box mean stands ~7 sigma out. Cells of ~100
    pixels, as on a large detector (a Pilatus 6M puts ~200 in a cell of CRYSTAL_GRID)."""
    panels = flat_detector()
    gm = build_grid_map(panels, BEAM, GridSpec(size=64, s_max=0.8))
    rng = np.random.default_rng(5)
    img = rng.poisson(10.0, size=(400, 400)).astype(np.int32)
    img[249:252, 299:302] += 8
    x = represent([img], [np.ones_like(img, bool)], gm, planes=3)
    spot_cell = np.unravel_index(np.argmax(x[2]), x[2].shape)
    probe = np.zeros_like(img)
    probe[250, 300] = 1
    assert spot_cell == np.unravel_index(np.argmax(represent([probe], [np.ones_like(img, bool)], gm)[0]), x[0].shape)
    assert (x[0] > x[0][spot_cell]).sum() > 10  # many background cells outshine it in the cell maximum
    others = np.delete(x[2][x[1] > 0], np.argmax(x[2][x[1] > 0]))
    assert x[2][spot_cell] > others.max() + 0.2


def test_planes_must_be_two_or_three_and_a_detector_beyond_the_grid_gives_empty_planes():
    gm = build_grid_map(flat_detector(n=40), BEAM, GridSpec(size=8, s_max=0.1))  # every pixel beyond |q| 0.1
    x = represent([np.ones((40, 40))], [np.ones((40, 40), bool)], gm, planes=3)
    assert x.shape == (3, 8, 8) and not x.any()
    with pytest.raises(ValueError, match="2 or 3 planes"):
        represent([np.ones((40, 40))], [np.ones((40, 40), bool)], gm, planes=4)
