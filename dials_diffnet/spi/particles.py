"""Coarse-grained bead models of biological particles for single-particle imaging.

No structure files can be downloaded here, so each particle is generated from
its published overall shape: beads on a regular lattice inside the shape (or on
a geodesic net for thin shells), each bead a Gaussian blob of protein-density
electrons. A regular lattice keeps the bead graininess out of the detector's
reach: its pseudo-Bragg peaks sit at |q| = 1/spacing >= 0.04 1/A, beyond the
pnCCD corner at the geometries we simulate (|q| <= 0.028 1/A), and the Gaussian
bead form factor damps them further.

Eight types are used for training ("seen"); four are held back ("unseen") to
test whether the twin network's single-vs-multi judgement transfers to new
samples. Sizes are maximal extents.

`random_shape(k)` ("random-k") adds procedural particles for training only: fused
ellipsoids, some hollow, ~11-80 nm. They teach the networks what a particle count
looks like independently of any one shape; no held-back type is ever generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

PROTEIN_ELECTRONS_PER_A3 = 0.43


@dataclass(frozen=True)
class Beads:
    positions: np.ndarray  # (N, 3) Angstrom, centred on the centre of mass
    electrons: np.ndarray  # (N,) electrons per bead
    sigma: float  # Gaussian bead radius (Angstrom): form factor exp(-2 pi^2 sigma^2 |q|^2)

    @property
    def radius(self) -> float:
        """Largest distance of a bead centre from the centre (Angstrom)."""
        return float(np.linalg.norm(self.positions, axis=1).max())

    @property
    def total_electrons(self) -> float:
        return float(self.electrons.sum())


@dataclass(frozen=True)
class ParticleType:
    name: str
    description: str
    size_nm: float  # maximal extent
    seen: bool  # used in training; unseen types are held back for the twin-network test
    build: Callable[[], Beads]


def _lattice(extent: float, spacing: float) -> np.ndarray:
    """Cubic lattice points covering [-extent, extent]^3."""
    axis = np.arange(-extent, extent + spacing / 2, spacing)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def _filled(inside: Callable[[np.ndarray], np.ndarray], extent: float, spacing: float) -> Beads:
    """Beads on a lattice wherever `inside(points)` holds; each carries its cube of protein."""
    points = _lattice(extent, spacing)
    points = points[inside(points)]
    points = points - points.mean(axis=0)
    electrons = np.full(len(points), PROTEIN_ELECTRONS_PER_A3 * spacing**3)
    return Beads(points, electrons, sigma=0.35 * spacing)


def _spherical_shell(outer: float, inner: float, extent: float, spacing: float) -> Beads:
    """Beads between radii `inner` and `outer` (Angstrom) about the origin."""

    def inside(p):
        r = np.linalg.norm(p, axis=1)
        return (r <= outer) & (r >= inner)

    return _filled(inside, extent, spacing)


def _ellipsoid(p, centre, radii):
    return (((p - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(axis=1) <= 1.0


def _cylinder(p, radius, z0, z1, inner=0.0):
    r = np.hypot(p[:, 0], p[:, 1])
    return (r <= radius) & (r >= inner) & (p[:, 2] >= z0) & (p[:, 2] <= z1)


def _icosahedron():
    t = (1 + 5**0.5) / 2
    v = np.array(
        [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
         [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float
    )
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    d = np.linalg.norm(v[:, None] - v[None], axis=2)
    edge = d[d > 0].min()
    faces = [
        (i, j, k)
        for i in range(12) for j in range(i + 1, 12) for k in range(j + 1, 12)
        if max(d[i, j], d[j, k], d[i, k]) < edge * 1.01
    ]
    return v, faces


def _faceted_icosahedral_shell(radius, spacing):
    """Points on the flat faces of an icosahedron with circumradius `radius` (a capsid's facets)."""
    v, faces = _icosahedron()
    edge = np.linalg.norm(v[faces[0][0]] - v[faces[0][1]]) * radius
    freq = max(1, int(round(edge / spacing)))
    pts = []
    for i, j, k in faces:
        for a in range(freq + 1):
            for b in range(freq + 1 - a):
                c = freq - a - b
                pts.append((a * v[i] + b * v[j] + c * v[k]) / freq * radius)
    pts = np.unique(np.round(np.array(pts), 3), axis=0)
    return pts, v * radius


def _shell_beads(points, spacing, thickness):
    electrons = np.full(len(points), PROTEIN_ELECTRONS_PER_A3 * spacing**2 * thickness)
    return Beads(points - points.mean(axis=0), electrons, sigma=0.35 * spacing)


def capsid():
    """PR772-like icosahedral virus capsid: faceted shell, 70 nm, pentons raised at the 12 vertices."""
    spacing = 22.0
    shell, vertices = _faceted_icosahedral_shell(330.0, spacing)
    pentons = np.concatenate([v * (1 + s / 330.0) for v in vertices for s in (15.0, 30.0)])
    pentons = pentons.reshape(-1, 3)
    return _shell_beads(np.concatenate([shell, pentons]), spacing, thickness=40.0)


def phage():
    """Tailed bacteriophage: prolate head (36 x 50 nm) and a 30 nm tail tube."""
    spacing = 22.0

    def inside(p):
        head = _ellipsoid(p, (0, 0, 150), (180, 180, 250)) & ~_ellipsoid(p, (0, 0, 150), (150, 150, 220))
        tail = _cylinder(p, 45.0, -250.0, -95.0, inner=15.0)
        return head | tail

    return _filled(inside, 420.0, spacing)


def groel():
    """GroEL-like chaperonin: two stacked heptameric rings, a 14 nm x 15 nm barrel with a central cavity."""
    spacing = 8.0
    centres = []
    for z, phase in ((37.0, 0.0), (-37.0, np.pi / 7)):
        for i in range(7):
            a = 2 * np.pi * i / 7 + phase
            centres.append((48 * np.cos(a), 48 * np.sin(a), z))

    def inside(p):
        return np.any([_ellipsoid(p, c, (24, 20, 36)) for c in centres], axis=0)

    return _filled(inside, 80.0, spacing)


def spike():
    """Spike-glycoprotein-like trimer: three head lobes on a thin stalk, 20 nm long (elongated)."""
    spacing = 8.0
    lobes = [(22 * np.cos(a), 22 * np.sin(a), 40.0) for a in 2 * np.pi * np.arange(3) / 3]

    def inside(p):
        head = np.any([_ellipsoid(p, c, (26, 26, 55)) for c in lobes], axis=0)
        return head | _cylinder(p, 14.0, -100.0, -10.0)

    return _filled(inside, 110.0, spacing)


def rod():
    """TMV-like helical rod: 18 nm diameter, 60 nm long, 4 nm central channel, helical groove (23 A pitch)."""
    spacing = 15.0

    def inside(p):
        r = np.hypot(p[:, 0], p[:, 1])
        groove = (r > 70) & (np.sin(2 * np.pi * p[:, 2] / 23.0 - np.arctan2(p[:, 1], p[:, 0])) > 0.3)
        return _cylinder(p, 90.0, -300.0, 300.0, inner=20.0) & ~groove

    return _filled(inside, 310.0, spacing)


def dumbbell():
    """Dumbbell: two 20 nm spheres joined by a 5 nm linker, 52 nm overall."""
    spacing = 16.0

    def inside(p):
        return _ellipsoid(p, (0, 0, 160), (100,) * 3) | _ellipsoid(p, (0, 0, -160), (100,) * 3) | _cylinder(
            p, 25.0, -160.0, 160.0
        )

    return _filled(inside, 270.0, spacing)


def ribosome():
    """Ribosome-like two-lobed blob: a large (26 nm) and a small (22 x 12 nm) subunit, 27 nm overall."""
    spacing = 12.0

    def inside(p):
        return _ellipsoid(p, (0, 0, -30), (130, 115, 100)) | _ellipsoid(p, (20, 0, 95), (110, 70, 55))

    return _filled(inside, 160.0, spacing)


def vesicle():
    """Lipid vesicle / nanoparticle: spherical shell, 40 nm outer diameter, 4 nm wall."""
    return _spherical_shell(outer=200.0, inner=160.0, extent=210.0, spacing=16.0)


def ferritin():
    """Ferritin-like cage: hollow sphere 12 nm outer, 8 nm inner diameter."""
    return _spherical_shell(outer=60.0, inner=40.0, extent=66.0, spacing=6.0)


def torus():
    """Ring-shaped complex (torus): 38 nm across, 8 nm thick."""
    spacing = 14.0

    def inside(p):
        r = np.hypot(p[:, 0], p[:, 1])
        return (r - 150.0) ** 2 + p[:, 2] ** 2 <= 40.0**2

    return _filled(inside, 200.0, spacing)


def enveloped():
    """Enveloped virus: 50 nm membrane sphere carrying ~60 spikes 10 nm long, 70 nm overall."""
    spacing = 20.0
    golden = np.pi * (3 - 5**0.5)
    k = np.arange(60)
    z = 1 - 2 * (k + 0.5) / 60
    axes = np.stack([np.sqrt(1 - z**2) * np.cos(golden * k), np.sqrt(1 - z**2) * np.sin(golden * k), z], 1)

    def inside(p):
        r = np.linalg.norm(p, axis=1)
        shell = (r <= 250.0) & (r >= 210.0)
        along = p @ axes.T  # (n, 60) projections on spike axes
        across = np.sqrt(np.maximum(r[:, None] ** 2 - along**2, 0))
        spikes = np.any((along >= 250.0) & (along <= 350.0) & (across <= 25.0), axis=1)
        return shell | spikes

    return _filled(inside, 360.0, spacing)


def disc():
    """Nanodisc / HDL-like flat disc: 44 nm across, 6 nm thick."""
    spacing = 14.0
    return _filled(lambda p: _cylinder(p, 220.0, -30.0, 30.0), 230.0, spacing)


PARTICLE_TYPES = {
    t.name: t
    for t in [
        ParticleType("capsid", capsid.__doc__, 76, True, capsid),
        ParticleType("phage", phage.__doc__, 80, True, phage),
        ParticleType("groel", groel.__doc__, 15, True, groel),
        ParticleType("spike", spike.__doc__, 20, True, spike),
        ParticleType("rod", rod.__doc__, 60, True, rod),
        ParticleType("dumbbell", dumbbell.__doc__, 52, True, dumbbell),
        ParticleType("ribosome", ribosome.__doc__, 27, True, ribosome),
        ParticleType("vesicle", vesicle.__doc__, 40, True, vesicle),
        ParticleType("ferritin", ferritin.__doc__, 12, False, ferritin),
        ParticleType("torus", torus.__doc__, 38, False, torus),
        ParticleType("enveloped", enveloped.__doc__, 70, False, enveloped),
        ParticleType("disc", disc.__doc__, 44, False, disc),
    ]
}
SEEN_TYPES = [name for name, t in PARTICLE_TYPES.items() if t.seen]
UNSEEN_TYPES = [name for name, t in PARTICLE_TYPES.items() if not t.seen]


RANDOM_PREFIX = "random-"
RANDOM_AXIS_RANGE = (0.2, 0.6)  # each ellipsoid semi-axis, as a fraction of the particle's radius
RANDOM_SIZE_NM = (14.0, 100.0)  # drawn; the fused bodies come out ~11-80 nm


def random_shape(index: int) -> Beads:
    """Procedural particle number `index`: 1-4 ellipsoids fused into one body (each new one centred
    inside a previous one), each hollow with probability 0.3, maximal extent ~11-80 nm."""
    rng = np.random.default_rng([7, index])
    radius = 5.0 * np.exp(rng.uniform(*np.log(RANDOM_SIZE_NM)))  # Angstrom, half the extent
    parts = []  # (centre, radii, hollow)
    for _ in range(int(rng.integers(1, 5))):
        radii = radius * rng.uniform(*RANDOM_AXIS_RANGE, 3)
        if parts:
            centre, r, _ = parts[rng.integers(len(parts))]
            direction = rng.standard_normal(3)
            centre = centre + direction / np.linalg.norm(direction) * r.min() * rng.uniform(0.3, 0.9)
        else:
            centre = np.zeros(3)
        parts.append((centre, radii, rng.uniform() < 0.3))
    # scale to the drawn size: how far the fused parts reach depends on how they were placed
    scale = radius / max(np.linalg.norm(c) + r.max() for c, r, _ in parts)
    parts = [(c * scale, r * scale, hollow) for c, r, hollow in parts]
    spacing = float(np.clip(radius / 12.0, 6.0, 22.0))

    def inside(p):
        hit = np.zeros(len(p), bool)
        for centre, radii, hollow in parts:
            body = _ellipsoid(p, centre, radii)
            if hollow:  # a wall of at least two bead spacings
                body &= ~_ellipsoid(p, centre, np.maximum(radii - 2 * spacing, 1e-3))
            hit |= body
        return hit

    return _filled(inside, radius + spacing, spacing)


def random_shape_names(n: int, start: int = 0) -> list:
    return [f"{RANDOM_PREFIX}{k}" for k in range(start, start + n)]


def random_shape_index(name: str) -> int | None:
    """k for a procedural particle's name "random-k", None for any other name."""
    number = name[len(RANDOM_PREFIX):]
    return int(number) if name.startswith(RANDOM_PREFIX) and number.isdigit() else None


def is_particle(name: str) -> bool:
    return name in PARTICLE_TYPES or random_shape_index(name) is not None


@lru_cache(maxsize=None)
def bead_model(name: str) -> Beads:
    index = random_shape_index(name)
    if index is not None:
        return random_shape(index)
    if name not in PARTICLE_TYPES:
        raise KeyError(f"unknown particle type {name!r}; known: {sorted(PARTICLE_TYPES)}")
    return PARTICLE_TYPES[name].build()
