"""SPI simulator physics: sphere minima, two-particle fringes, seeds, photon statistics, detector."""

import math

import numpy as np
import pytest
import torch

from dials_diffnet.spi import SPI_GRID
from dials_diffnet.spi import simulate as sim
from dials_diffnet.spi.particles import PARTICLE_TYPES, SEEN_TYPES, UNSEEN_TYPES, Beads, bead_model

torch.set_num_threads(1)


def solid_sphere(radius, spacing):
    axis = np.arange(-radius, radius + spacing / 2, spacing)
    p = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    p = p[np.linalg.norm(p, axis=1) <= radius]
    return Beads(p, np.ones(len(p)), sigma=0.35 * spacing)


def radial_q(s_values, direction=(1.0, 0.0, 0.0)):
    return np.asarray(s_values)[:, None] * np.asarray(direction)[None, :]


def test_particle_catalogue():
    assert len(PARTICLE_TYPES) >= 8 and len(SEEN_TYPES) >= 6 and len(UNSEEN_TYPES) >= 3
    for name, ptype in PARTICLE_TYPES.items():
        beads = bead_model(name)
        assert np.allclose(beads.positions.mean(axis=0), 0, atol=1e-6)
        extent = np.ptp(beads.positions, axis=0).max() / 10  # nm
        assert 8 <= extent <= 82 and abs(extent - ptype.size_nm) < 0.25 * ptype.size_nm, name


def test_sphere_minima_at_4_49_over_R():
    """|F|^2 of a uniform sphere vanishes where 2 pi s R = 4.493, 7.725 (zeros of tan x = x)."""
    radius = 100.0
    transform = sim.ParticleTransform(solid_sphere(radius, 5.0), reach=0.014)
    s = np.linspace(0.002, 0.0135, 800)
    rot = sim.random_rotations(np.random.default_rng(3), 1)
    intensity = sim.scattered_intensity(transform, radial_q(s, (0.6, 0.0, 0.8)), rot, np.zeros((1, 3)))
    interior = (intensity[1:-1] < intensity[:-2]) & (intensity[1:-1] < intensity[2:])
    minima = s[1:-1][interior]
    expected = np.array([4.493, 7.725]) / (2 * math.pi * radius)
    assert len(minima) == 2
    assert np.allclose(minima, expected, rtol=0.03)
    # the grid interpolation agrees with the exact bead sum
    beads = solid_sphere(radius, 5.0)
    q = radial_q(s[::40], (0.6, 0.0, 0.8))
    exact = np.abs((np.exp(2j * np.pi * q @ beads.positions.T)).sum(1)) ** 2
    exact *= np.exp(-2 * math.pi**2 * beads.sigma**2 * (q**2).sum(1)) ** 2
    assert np.allclose(sim.scattered_intensity(transform, q, np.eye(3)[None], np.zeros((1, 3))), exact,
                       rtol=0.05, atol=0.01 * exact.max())


def test_two_particles_interfere_with_period_one_over_separation():
    separation = 600.0
    transform = sim.ParticleTransform(solid_sphere(30.0, 6.0), reach=0.02)
    s = np.linspace(0.0, 0.01, 2001)
    q = radial_q(s)
    one = sim.scattered_intensity(transform, q, np.eye(3)[None], np.zeros((1, 3)))
    offsets = np.array([[-separation / 2, 0, 0], [separation / 2, 0, 0]])
    two = sim.scattered_intensity(transform, q, np.stack([np.eye(3)] * 2), offsets)
    ratio = two / one
    expected = 2 + 2 * np.cos(2 * math.pi * s * separation)
    assert np.corrcoef(ratio, expected)[0, 1] > 0.999
    spectrum = np.abs(np.fft.rfft(ratio - ratio.mean()))
    frequency = np.fft.rfftfreq(len(s), d=s[1] - s[0])[spectrum.argmax()]  # cycles per (1/A) = A
    assert abs(frequency - separation) < 0.02 * separation
    # fringes perpendicular to the separation do not exist
    across = sim.scattered_intensity(transform, radial_q(s, (0, 1, 0)), np.stack([np.eye(3)] * 2), offsets)
    assert np.allclose(across / one, 4.0, rtol=1e-3)


def test_forward_scattering_is_electron_count_squared():
    beads = bead_model("groel")
    transform = sim.ParticleTransform(beads)
    i0 = sim.scattered_intensity(transform, np.zeros((1, 3)), np.eye(3)[None], np.zeros((1, 3)))[0]
    assert i0 == pytest.approx(beads.total_electrons**2, rel=1e-4)


def test_identical_seeds_identical_images():
    a = sim.simulate(sim.shot_params(11, "spike", 3, "noisy", "test"))
    b = sim.simulate(sim.shot_params(11, "spike", 3, "noisy", "test"))
    c = sim.simulate(sim.shot_params(12, "spike", 3, "noisy", "test"))
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert np.array_equal(a.params.offsets, b.params.offsets)
    drawn = sim.shot_params(11)  # particle and count drawn from the seed too
    assert drawn.particle in PARTICLE_TYPES and 1 <= drawn.count <= 4
    assert sim.shot_params(11).labels() == drawn.labels()


def test_a_blank_shot_records_the_detector_noise_only():
    params = sim.shot_params(21, count=0, noise="noisy", pool="test", readout_sigma=0.3)
    assert params.count == 0 and params.particle == sim.BLANK and params.offsets.shape == (0, 3)
    assert not sim.expected_photons(params).any()
    shot = sim.simulate(params)
    assert 0.03 < shot.image[shot.valid].mean() < 0.07  # false photons from readout noise only
    # a blank's readout noise is drawn per frame (a hit is told by its pattern, not by one noise level);
    # a particle shot's stays READOUT_SIGMA
    sigmas = [sim.shot_params(seed, count=0).readout_sigma for seed in range(40)]
    lo, hi = sim.BLANK_READOUT_RANGE
    assert lo <= min(sigmas) and max(sigmas) <= hi and max(sigmas) - min(sigmas) > (hi - lo) / 2
    assert sim.shot_params(21, "capsid", 2).readout_sigma == sim.READOUT_SIGMA
    assert not sim.simulate(sim.shot_params(21, count=0, noise="clean", pool="test")).image.any()
    with pytest.raises(ValueError, match="count must be 0-4"):
        sim.shot_params(21, "capsid", 5)


def test_poisson_mean_matches_fluence_and_readout_noise_is_bounded():
    params = sim.shot_params(5, "dumbbell", 2, "noisy", "train", readout_sigma=0.0)
    expected = sim.expected_photons(params) * sim.pnccd_valid()
    shot = sim.simulate(params)
    total = expected.sum()
    assert abs(shot.image.sum() - total) < 5 * math.sqrt(total)
    assert np.all(shot.image == np.rint(shot.image)) and shot.image.min() >= 0
    # expected photons scale linearly with fluence
    params2 = sim.shot_params(5, "dumbbell", 2, "noisy", "train", nominal_fluence=2 * sim.NOMINAL_FLUENCE)
    assert sim.expected_photons(params2).sum() == pytest.approx(2 * sim.expected_photons(params).sum(), rel=1e-5)
    # readout noise alone (no photons) makes false photons at the rate of P(N(0, 0.3) > 0.5)
    dark = sim.simulate(sim.shot_params(6, "spike", 1, "noisy", "train", nominal_fluence=1e-6))
    rate = dark.image[dark.valid].mean()
    assert 0.03 < rate < 0.07


def test_clusters_keep_particles_apart_and_within_three_diameters():
    rng = np.random.default_rng(0)
    for count in (2, 3, 4):
        centres = sim.cluster_offsets(rng, count, 100.0)
        d = np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(count, 1)]
        assert d.min() >= 100.0 and np.allclose(centres.mean(0), 0)
        nearest = np.sort(np.linalg.norm(centres[:, None] - centres[None], axis=2), axis=1)[:, 1]
        assert nearest.max() <= 300.0 + 1e-9


def test_pnccd_detector_and_grid():
    valid = sim.pnccd_valid()
    assert valid.shape == (1056, 1024)
    assert not valid[512:544].any()  # the gap between the halves
    assert not valid[528, 512] and valid[0, 0] and valid[-1, -1]  # beamstop hole at the centre
    assert 2 * 1024 * 512 - valid.sum() < 0.02 * 2 * 1024 * 512
    shot = sim.simulate(sim.shot_params(1, "ribosome", 2, "clean", "train"))
    x = sim.represent_shot(shot)
    assert x.shape == (2, SPI_GRID.size, SPI_GRID.size) and x.dtype == np.float32
    assert 0.9 < x[1].mean() < 1.0  # the grid lies inside the detector; only gap and hole are invalid
    rows = x[1].sum(axis=1)
    assert rows[SPI_GRID.size // 2] < 0.2 * SPI_GRID.size  # the gap crosses the grid's middle


def test_random_shapes_are_single_bodies_of_varied_size_and_repeat_from_their_index():
    from dials_diffnet.spi.particles import random_shape, random_shape_names

    names = random_shape_names(40)
    extents, bodies = [], set()
    for name in names:
        beads = bead_model(name)
        assert np.allclose(beads.positions.mean(axis=0), 0, atol=1e-6)
        # bead graininess stays beyond the detector's reach, as for the named types
        assert beads.sigma / 0.35 <= 22.0 + 1e-9
        # one body: no bead is further than ~one lattice step from another one
        p = beads.positions
        nearest = np.sort(np.linalg.norm(p[:200, None] - p[None], axis=2), axis=1)[:, 1]
        assert nearest.max() <= 1.01 * beads.sigma / 0.35 * np.sqrt(3)
        extents.append(np.ptp(p, axis=0).max() / 10)
        bodies.add(np.round(p, 3).tobytes())
    assert 8 <= min(extents) < 20 and 50 < max(extents) <= 82 and len(bodies) == len(names)
    assert np.array_equal(random_shape(3).positions, bead_model("random-3").positions)
    shot = sim.shot_params(11, "random-3", 2, "clean", "train")
    assert shot.particle == "random-3" and shot.count == 2
    for bad in ("random-", "random-x", "torus2"):
        with pytest.raises(ValueError):
            sim.shot_params(11, bad, 2, "clean", "train")
