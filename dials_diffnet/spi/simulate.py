"""Single-particle-imaging shots on a pnCCD-like detector: far-field diffraction of 1-4 particles.

Physics. The amplitude scattered by beads r_j with electrons f_j is
    A(q) = sum_j f_j exp(-2 pi^2 sigma^2 |q|^2) exp(2 pi i q . r_j)      (q = s1 - s0, |q| = 1/d)
and a shot with particles k (rotation R_k, centre t_k) scatters
    A_shot(q) = sum_k A_type(R_k^T q) exp(2 pi i q . t_k),
coherently: the particles' fields interfere and give fringes with period 1/|separation|.
Expected photons per pixel = fluence * r_e^2 * |A_shot|^2 * solid angle * polarisation.

Speed. Each particle type's A(q) is evaluated once, exactly, on a 3-D reciprocal-space
grid (step 1/(3 x diameter): three-fold oversampled, so linear interpolation is
accurate to a few per cent) and then sampled at every shot's rotated q by trilinear
interpolation (torch `grid_sample`, so it runs on a GPU when one is given). The q
vectors are the exact 3-D q of detector pixel bins (b x b pixels, b chosen so a bin is
at most half a cell of the grid the shots are for, SPI_GRID unless told: one pixel on
the 256-cell grid, 2-4 on the 128-cell one): Ewald-sphere curvature is included. Bin intensities
are expanded back to every pixel before photon noise, so the stored image is a full
detector image.

Detector. pnCCD-like: two 1024 x 512 halves of 75 um pixels stacked with a 2.4 mm
(32-pixel) gap through which the beam passes, and a 3 mm-radius beamstop hole; stored
as one assembled 1024 x 1056 frame whose gap and hole pixels are invalid.

Geometry. Photon energy and distance are drawn from pools with distance x wavelength
in 2000-3200 mm*A (1.2-4 keV, 220-680 mm): the detector edge then sits at
|q| = 0.012-0.019 1/A, the reach of SPI_GRID, and pixels are finer than a grid cell.
Training and test sets use different pools.

Noise ("noisy" shots): Poisson photon statistics, Gaussian readout noise (sigma in
photons, default 0.3) and rounding to whole photons with negatives clipped to 0, as
photon-converted pnCCD data are published. "clean" shots store the expected photons.
Fluence jitters log-normally from shot to shot.

Every shot is regenerated exactly from (seed, particle, count, noise, pool):
`shot_params` draws everything else from `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch

from dials_diffnet.representation import BeamGeometry, GridSpec, PanelGeometry, cached_grid_map, pixel_q, represent
from dials_diffnet.spi import SPI_GRID
from dials_diffnet.spi.particles import PARTICLE_TYPES, Beads, bead_model, is_particle

# pnCCD-like detector
PIXEL_MM = 0.075
HALF_FAST, HALF_SLOW = 1024, 512
GAP_PIXELS = 32
FRAME_SHAPE = (2 * HALF_SLOW + GAP_PIXELS, HALF_FAST)  # (slow, fast)
HOLE_RADIUS_MM = 3.0

KEV_ANGSTROM = 12.398420
R_E_SQUARED = 7.9407877e-10  # classical electron radius squared, Angstrom^2
Q_REACH = 0.028  # 1/A: the pnCCD corner at the shortest distance x wavelength we simulate
OVERSAMPLING = 3.0

# (photon energy keV, distance mm); disjoint pools for training and testing
GEOMETRY_POOLS = {
    "train": ((1.2, 220.0), (1.5, 300.0), (1.7, 350.0), (2.0, 420.0), (2.5, 500.0), (3.5, 650.0)),
    "test": ((1.4, 260.0), (1.9, 450.0), (3.0, 600.0), (4.0, 680.0)),
}
NOMINAL_FLUENCE = 1.0e13  # photons / um^2 (a focused XFEL pulse)
FLUENCE_JITTER = 0.5  # sigma of ln(fluence)
READOUT_SIGMA = 0.3  # photons
# A noisy blank's readout noise, drawn per frame: a hit head trained on blanks of one noise level takes
# any other level for a particle (session 31: blanks at 0.1 or 0.4 photon were called hits)
BLANK_READOUT_RANGE = (0.05, 0.45)
SEPARATION_RANGE = (1.0, 3.0)  # centre-to-centre distance to a neighbour, in particle diameters
MAX_COUNT = 4
BLANK = "none"  # the particle of a blank shot (count 0: no particle in the beam, detector noise only)


def pnccd_panel(distance_mm: float) -> PanelGeometry:
    """The assembled pnCCD frame (both halves and the gap between them) normal to the beam, beam at its centre."""
    n_slow, n_fast = FRAME_SHAPE
    origin = (-n_fast / 2 * PIXEL_MM, n_slow / 2 * PIXEL_MM, -float(distance_mm))
    return PanelGeometry(origin, (1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (PIXEL_MM, PIXEL_MM), (n_fast, n_slow))


def pnccd_beam(energy_kev: float) -> BeamGeometry:
    return BeamGeometry(direction=(0.0, 0.0, -1.0), wavelength=KEV_ANGSTROM / float(energy_kev))


@lru_cache(maxsize=1)
def pnccd_valid() -> np.ndarray:
    """Pixels that exist and see photons: not in the gap between the halves, not in the beamstop hole."""
    n_slow, n_fast = FRAME_SHAPE
    valid = np.ones(FRAME_SHAPE, bool)
    valid[HALF_SLOW : HALF_SLOW + GAP_PIXELS] = False
    y = (np.arange(n_slow) + 0.5 - n_slow / 2) * PIXEL_MM
    x = (np.arange(n_fast) + 0.5 - n_fast / 2) * PIXEL_MM
    valid &= np.hypot(y[:, None], x[None, :]) > HOLE_RADIUS_MM
    valid.setflags(write=False)
    return valid


@dataclass
class ShotParams:
    """Everything that defines one shot; `shot_params(seed, ...)` rebuilds it from the seed."""

    seed: int
    particle: str
    count: int
    noise: str  # "clean" or "noisy"
    pool: str
    energy_kev: float
    distance_mm: float
    fluence: float  # photons / um^2 after jitter
    readout_sigma: float
    rotations: np.ndarray = field(repr=False)  # (count, 3, 3)
    offsets: np.ndarray = field(repr=False)  # (count, 3) Angstrom, centred on the cluster's centroid

    def labels(self) -> dict:
        d = asdict(self)
        d["rotations"] = self.rotations.tolist()
        d["offsets"] = self.offsets.tolist()
        return d


def random_rotations(rng, n) -> np.ndarray:
    """Uniformly distributed rotation matrices (from normalised Gaussian quaternions)."""
    w, x, y, z = (rng.standard_normal((4, n)) / 1.0)
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def cluster_offsets(rng, count, diameter) -> np.ndarray:
    """Particle centres as in a drying droplet: each new particle sits 1-3 diameters from a random
    earlier one and no closer than one diameter to any (bounding spheres never overlap)."""
    if count == 0:
        return np.zeros((0, 3))
    centres = [np.zeros(3)]
    while len(centres) < count:
        anchor = centres[rng.integers(len(centres))]
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        candidate = anchor + direction * diameter * rng.uniform(*SEPARATION_RANGE)
        if all(np.linalg.norm(candidate - c) >= diameter for c in centres):
            centres.append(candidate)
    centres = np.array(centres)
    return centres - centres.mean(axis=0)


def shot_params(
    seed: int,
    particle: str | None = None,
    count: int | None = None,
    noise: str = "noisy",
    pool: str = "train",
    nominal_fluence: float = NOMINAL_FLUENCE,
    readout_sigma: float | None = None,
) -> ShotParams:
    """Draw a shot from its seed; particle and count are drawn too when not given. Count 0 is a blank:
    no particle in the beam (particle BLANK), the geometry and fluence still drawn, only noise recorded.
    readout_sigma (noisy shots; None: READOUT_SIGMA, for a blank drawn from BLANK_READOUT_RANGE)."""
    if noise not in ("clean", "noisy"):
        raise ValueError(f"noise must be 'clean' or 'noisy', not {noise!r}")
    rng = np.random.default_rng(seed)
    names = sorted(PARTICLE_TYPES)
    drawn_particle, drawn_count = names[rng.integers(len(names))], int(rng.integers(1, MAX_COUNT + 1))
    count = drawn_count if count is None else count
    if not 0 <= count <= MAX_COUNT:
        raise ValueError(f"count must be 0-{MAX_COUNT} (0: a blank), not {count}")
    particle = BLANK if count == 0 else particle or drawn_particle
    if count and not is_particle(particle):
        raise ValueError(f"unknown particle type {particle!r}")
    energy, distance = GEOMETRY_POOLS[pool][rng.integers(len(GEOMETRY_POOLS[pool]))]
    fluence = nominal_fluence * math.exp(FLUENCE_JITTER * rng.standard_normal())
    diameter = 2 * bead_model(particle).radius if count else 0.0
    params = ShotParams(
        seed=int(seed),
        particle=particle,
        count=int(count),
        noise=noise,
        pool=pool,
        energy_kev=energy,
        distance_mm=distance,
        fluence=fluence,
        readout_sigma=0.0,
        rotations=random_rotations(rng, count),
        offsets=cluster_offsets(rng, count, diameter),
    )
    if noise == "noisy":  # drawn last: a blank's draw leaves every other shot's draws as they were
        params.readout_sigma = (float(readout_sigma) if readout_sigma is not None else
                                rng.uniform(*BLANK_READOUT_RANGE) if count == 0 else READOUT_SIGMA)
    return params


class ParticleTransform:
    """A particle's complex amplitude A(q) on a cubic reciprocal-space grid, for trilinear sampling."""

    def __init__(self, beads: Beads, device="cpu", reach: float = Q_REACH):
        step = 1.0 / (OVERSAMPLING * 2 * beads.radius)
        half = int(math.ceil(reach / step))
        self.edge = half * step  # |q| of the outermost grid plane
        axis = torch.arange(-half, half + 1, dtype=torch.float64, device=device) * step
        self.values = self._evaluate(beads, axis).to(device)

    @staticmethod
    def _evaluate(beads, axis, chunk=512):
        """Exact bead sum on the grid, separably: exp(2 pi i q.r) = e^(2 pi i qx x) e^(2 pi i qy y) e^(2 pi i qz z).
        Only qz >= 0 is summed; the other half follows from Friedel symmetry A(-q) = conj A(q)."""
        device = axis.device
        n, mid = axis.numel(), axis.numel() // 2
        pos = torch.as_tensor(beads.positions, dtype=torch.float64, device=device)
        weight = torch.as_tensor(beads.electrons, dtype=torch.float64, device=device)
        half = torch.zeros(n * n, n - mid, dtype=torch.complex64, device=device)
        for start in range(0, len(pos), chunk):
            p, w = pos[start : start + chunk], weight[start : start + chunk]
            ex, ey, ez = (torch.exp(2j * math.pi * p[:, i : i + 1] * axis[None, :]).to(torch.complex64) for i in range(3))
            exy = (w[:, None, None].to(torch.complex64) * ex[:, :, None] * ey[:, None, :]).reshape(len(p), n * n)
            half += exy.T @ ez[:, mid:]
        half = half.to(torch.complex128).reshape(n, n, n - mid)
        lower = torch.conj(torch.flip(half[:, :, 1:], dims=(0, 1, 2)))
        amp = torch.cat([lower, half], dim=2)
        qx, qy, qz = torch.meshgrid(axis, axis, axis, indexing="ij")
        amp = amp * torch.exp(-2 * math.pi**2 * beads.sigma**2 * (qx**2 + qy**2 + qz**2))
        # grid_sample wants (N, C, D, H, W) with the last grid coordinate indexing D: keep (qx, qy, qz) = (D, H, W)
        return torch.stack([amp.real, amp.imag]).to(torch.float32)[None]

    def sample(self, q: torch.Tensor) -> torch.Tensor:
        """Complex amplitude at q (..., 3) in the particle frame; zero beyond the grid."""
        shape = q.shape[:-1]
        coords = (q.reshape(1, -1, 1, 1, 3).flip(-1) / self.edge).to(self.values.dtype)
        out = torch.nn.functional.grid_sample(
            self.values, coords, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out = out.reshape(2, -1)
        return torch.complex(out[0], out[1]).reshape(shape)


_TRANSFORMS: dict = {}


def particle_transform(name: str, device="cpu") -> ParticleTransform:
    """One transform per (type, device), built on first use (0.02-3 s each on one CPU thread)."""
    key = (name, str(torch.device(device)))
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = ParticleTransform(bead_model(name), device)
    return _TRANSFORMS[key]


def scattered_intensity(transform: ParticleTransform, q, rotations, offsets) -> np.ndarray:
    """|sum_k A(R_k^T q) exp(2 pi i q.t_k)|^2 in electrons^2 at q (P, 3), particles k of one type."""
    device = transform.values.device
    q = torch.as_tensor(q, dtype=torch.float64, device=device)
    rot = torch.as_tensor(rotations, dtype=torch.float64, device=device)
    t = torch.as_tensor(offsets, dtype=torch.float64, device=device)
    amp = transform.sample(torch.einsum("pi,kij->kpj", q, rot))  # A(R_k^T q) for every particle k
    phase = torch.exp(2j * math.pi * (q @ t.T)).T.to(torch.complex64)  # (k, p)
    return ((amp * phase).sum(0).abs() ** 2).cpu().numpy().astype(np.float64)


@dataclass
class DetectorBins:
    """q, solid angle and polarisation at the centres of b x b pixel bins of one geometry."""

    bin: int
    q: np.ndarray  # (n_slow_bins, n_fast_bins, 3)
    scale: np.ndarray  # solid angle x polarisation factor per pixel, (n_slow_bins, n_fast_bins)


@lru_cache(maxsize=32)
def detector_bins(energy_kev: float, distance_mm: float, grid: GridSpec = SPI_GRID) -> DetectorBins:
    """Bins of at most half a cell of `grid`: finer detail than the network input holds is not worth the time."""
    panel, beam = pnccd_panel(distance_mm), pnccd_beam(energy_kev)
    pixel_step = PIXEL_MM / (distance_mm * beam.wavelength)  # |q| per pixel near the beam
    b = max(1, int(grid.cell / 2 / pixel_step))
    n_fast, n_slow = panel.image_size
    binned = PanelGeometry(
        panel.origin, panel.fast, panel.slow, (PIXEL_MM * b, PIXEL_MM * b), (-(-n_fast // b), -(-n_slow // b))
    )
    q = pixel_q(binned, beam)
    unit_s1 = q * beam.wavelength + np.asarray(beam.direction)
    cos_incidence = -unit_s1[..., 2]  # detector normal is the beam
    solid_angle = PIXEL_MM**2 * cos_incidence**3 / distance_mm**2
    polarisation = 1.0 - unit_s1[..., 0] ** 2  # horizontally polarised XFEL beam
    return DetectorBins(b, q, solid_angle * polarisation)


def expected_photons(params: ShotParams, device="cpu", grid: GridSpec = SPI_GRID) -> np.ndarray:
    """Noise-free photons per pixel on the assembled frame (gap and hole included, masked later)."""
    if params.count == 0:
        return np.zeros(FRAME_SHAPE, np.float32)
    bins = detector_bins(params.energy_kev, params.distance_mm, grid)
    transform = particle_transform(params.particle, device)
    intensity = scattered_intensity(transform, bins.q.reshape(-1, 3), params.rotations, params.offsets)
    photons = intensity.reshape(bins.q.shape[:2]) * bins.scale
    photons *= params.fluence * 1e-8 * R_E_SQUARED  # photons/um^2 -> photons/A^2
    b = bins.bin
    return np.repeat(np.repeat(photons, b, 0), b, 1)[: FRAME_SHAPE[0], : FRAME_SHAPE[1]].astype(np.float32)


@dataclass
class SpiShot:
    image: np.ndarray  # (1056, 1024) float32 photons; invalid pixels 0
    valid: np.ndarray  # bool, same shape
    panel: PanelGeometry
    beam: BeamGeometry
    params: ShotParams


def simulate(params: ShotParams, device="cpu", grid: GridSpec = SPI_GRID) -> SpiShot:
    """The shot of `params`, its pixels binned finely enough for `grid` (see detector_bins)."""
    image = expected_photons(params, device, grid)
    if params.noise == "noisy":
        # noise from the shot's own stream, after the parameters it drew, so images repeat exactly
        rng = np.random.default_rng([params.seed, 1])
        image = rng.poisson(image).astype(np.float32)
        image += np.float32(params.readout_sigma) * rng.standard_normal(image.shape, dtype=np.float32)
        image = np.maximum(np.rint(image), 0.0)
    valid = pnccd_valid()
    image = np.where(valid, image, 0.0).astype(np.float32)
    return SpiShot(image, valid, pnccd_panel(params.distance_mm), pnccd_beam(params.energy_kev), params)


def represent_shot(shot: SpiShot, grid: GridSpec = SPI_GRID) -> np.ndarray:
    """The network input of a simulated shot, through the one representation function."""
    grid_map = cached_grid_map((shot.panel,), shot.beam, grid)
    return represent([shot.image], [shot.valid], grid_map)
