"""Physically labelled crystallography stills.

A shot is fully described by `ShotParams` (drawn from a seed), so any image can
be regenerated. `render()` produces detector pixels (photon-counting or
integrating noise), validity masks and the labels; the network input is then
made by `representation.represent`, the same function inference uses.

Physics, per lattice: reciprocal lattice A = U B (uniformly random U); the
nodes near the Ewald sphere are found per (h, k) row by solving for l; each
node's excitation error eps = |s0 + q| - |s0| against a rocking width from
mosaic spread / beam divergence, bandwidth and domain size gives a Gaussian
partiality (the stills form of the Lorentz factor); intensities are
Wilson-distributed |F|^2 damped by exp(-B s^2 / 2), times polarisation, a
photon scale from exposure and cell volume. Spots are 2-D Gaussians on the
panel they hit. Background: water rings, air scatter, optional ice rings,
scaled by pixel solid angle and polarisation; beamstop shadow; dead and hot
pixels; Poisson noise (+ gain, offset, readout noise for integrating detectors).

Labels (exact definitions, also in the model card):
- expected I/sigma of a reflection = I / sqrt(I + A_eff * (b + r^2)), I the
  expected photons in the spot (partiality included), b the expected background
  photons per pixel at the spot, r the readout noise in photons, A_eff = 4 pi sigma_px^2.
- recorded reflection: partiality >= 0.1 and its spot centre on a trusted pixel
  outside the beamstop shadow.
- detectable spot: recorded with expected I/sigma >= 3.
- resolution s_min = 1/d_min: reflections sorted by |q|, running mean of expected
  I/sigma over windows of max(20, n/15) reflections; s_min is the largest |q|
  whose window mean is >= 2.0. `edge_limited` when that is the last window
  (the detector edge, not the crystal, limits it) or beyond the grid reach.
- hit: >= 10 detectable spots.
- multi-lattice: >= 2 lattices each with >= 15% of the detectable spots and >= 5 of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dials_diffnet.representation import CRYSTAL_GRID, BeamGeometry, cached_grid_map, isolated_overloads, pixel_q
from dials_diffnet.simulate.detectors import DETECTORS, module_gap_mask, panel_geometries

IOS_THRESHOLD = 2.0
DETECTABLE_IOS = 3.0
MIN_PARTIALITY = 0.1
HIT_MIN_SPOTS = 10
MULTI_MIN_SHARE = 0.15
MULTI_MIN_SPOTS = 5
ICE_D_SPACINGS = (3.897, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883, 1.721)
# The detectors of the first training seeds (1-3); from seed 4 on the recipe adds the Eiger 16M
# (scripts/train_crystal.sh). The Eiger 4M is never trained on: evaluation on it tests an unseen detector.
TRAINING_DETECTORS = ("pilatus6m", "pilatus2m", "rayonix340", "cspad", "jungfrau4m")
LABEL_DEFINITIONS = __doc__[__doc__.index("Labels") :].strip()


@dataclass
class Recipe:
    """What a data set covers. Defaults are the first training seeds' recipe; later seeds widen
    the detectors and wavelengths by PHIL (scripts/train_crystal.sh)."""

    detectors: dict = field(
        default_factory=lambda: dict.fromkeys(TRAINING_DETECTORS, 1.0)
    )
    wavelength: tuple = (0.7, 1.8)
    distance_scale: tuple = (1.0, 1.0)  # multiplies each detector's distance range (held-out ranges)
    p_blank: float = 0.12
    lattice_counts: tuple = (0.5, 0.33, 0.17)  # P(1), P(2), P(3) lattices, given a crystal
    p_small_misorientation: float = 0.3  # 2nd/3rd lattice within 0.3-5 deg of the first
    cell_edge: tuple = (20.0, 250.0)  # Angstrom, log-uniform
    unit_cell: tuple | None = None  # serial-crystallography mode: every crystal has this cell ...
    crystal_system: str = "triclinic"  # ... and this system
    exposure: tuple = (0.3, 3000.0)  # photon scale, log-uniform
    b_factor: tuple = (5.0, 90.0)
    p_ice: float = 0.15
    images_per_geometry: int = 8  # geometry (detector, distance, wavelength, beam centre) shared by this many shots


@dataclass
class Lattice:
    cell: tuple  # a, b, c, alpha, beta, gamma
    system: str
    U: list  # 3x3 row-major rotation
    scale: float  # relative strength of this lattice


@dataclass
class ShotParams:
    seed: int
    detector: str
    distance: float
    wavelength: float
    beam_xy: tuple
    lattices: list
    exposure: float
    b_factor: float
    mosaic_deg: float
    divergence_deg: float
    bandwidth: float  # relative, FWHM-ish
    domain_size: float  # Angstrom
    spot_sigma_mm: float
    water: float  # background photons / pixel at the water-ring peak (172 um pixel at 200 mm)
    air: float
    ice: list  # relative ice-ring strengths (empty: no ice)
    beamstop: tuple  # (radius mm, arm angle deg), part of the geometry
    polarization: float
    gain: float
    readout: float  # photons
    offset: float  # ADU

    def to_json(self):
        return asdict(self)


# ---------------------------------------------------------------- sampling


def random_rotation(rng):
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def small_rotation(rng, max_deg):
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.3, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def random_cell(rng, edge_range):
    lo, hi = np.log(edge_range[0]), np.log(edge_range[1])
    edges = np.exp(rng.uniform(lo, hi, 3))
    system = rng.choice(["cubic", "tetragonal", "orthorhombic", "hexagonal", "monoclinic", "triclinic"], p=[0.1, 0.2, 0.3, 0.15, 0.2, 0.05])
    a, b, c = edges
    al = be = ga = 90.0
    if system == "cubic":
        b = c = a
    elif system == "tetragonal":
        b = a
    elif system == "hexagonal":
        b, ga = a, 120.0
    elif system == "monoclinic":
        be = rng.uniform(95.0, 120.0)
    elif system == "triclinic":
        al, be, ga = rng.uniform(75.0, 110.0, 3)
    return (float(a), float(b), float(c), float(al), float(be), float(ga)), str(system)


def log_uniform(rng, lo_hi):
    return float(np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]))))


def sample_geometry(rng, recipe: Recipe):
    names = list(recipe.detectors)
    p = np.array([recipe.detectors[n] for n in names], dtype=float)
    name = str(rng.choice(names, p=p / p.sum()))
    model = DETECTORS[name]
    lo, hi = model.distance_range
    scale = rng.uniform(*recipe.distance_scale)
    return dict(
        detector=name,
        distance=float(rng.uniform(lo, hi) * scale),
        wavelength=float(rng.uniform(*recipe.wavelength)),
        beam_xy=tuple(float(v) for v in rng.normal(0.0, 1.5, 2)),
        beamstop=(float(rng.uniform(1.0, 3.5)), float(rng.choice([0.0, 90.0, 180.0, 270.0]) + rng.normal(0, 5))),
    )


def sample_shot(seed: int, recipe: Recipe, geometry: dict | None = None) -> ShotParams:
    rng = np.random.default_rng(seed)
    geometry = geometry or sample_geometry(rng, recipe)
    lattices = []
    if rng.random() >= recipe.p_blank:
        n = 1 + int(rng.choice(3, p=recipe.lattice_counts))
        cell, system = random_cell(rng, recipe.cell_edge)
        if recipe.unit_cell is not None:
            cell, system = tuple(float(v) for v in recipe.unit_cell), recipe.crystal_system
        U0 = random_rotation(rng)
        for i in range(n):
            if i == 0:
                U = U0
            elif rng.random() < recipe.p_small_misorientation:
                U = small_rotation(rng, 5.0) @ U0
            else:
                U = random_rotation(rng)
            scale = 1.0 if i == 0 else float(np.exp(rng.uniform(np.log(0.1), 0.0)))
            lattices.append(Lattice(cell=cell, system=system, U=U.ravel().tolist(), scale=scale))
    model = DETECTORS[geometry["detector"]]
    integrating = not model.counting
    return ShotParams(
        seed=int(seed),
        lattices=lattices,
        exposure=log_uniform(rng, recipe.exposure),
        b_factor=float(rng.uniform(*recipe.b_factor)),
        mosaic_deg=log_uniform(rng, (0.01, 0.5)),
        divergence_deg=log_uniform(rng, (0.005, 0.05)),
        bandwidth=log_uniform(rng, (2e-4, 1e-2)),
        domain_size=log_uniform(rng, (1000.0, 20000.0)),
        spot_sigma_mm=float(rng.uniform(0.05, 0.18)),
        water=log_uniform(rng, (0.05, 30.0)),
        air=log_uniform(rng, (0.01, 3.0)),
        ice=(rng.uniform(0.0, 1.0, len(ICE_D_SPACINGS)) ** 3 * log_uniform(rng, (2.0, 200.0))).tolist()
        if rng.random() < recipe.p_ice
        else [],
        polarization=float(rng.uniform(0.9, 0.999)),
        gain=float(rng.uniform(0.8, 2.0)) if integrating else 1.0,
        readout=float(rng.uniform(0.05, 0.4)) if integrating else 0.0,
        offset=10.0 if model.name == "rayonix340" else 0.0,
        **geometry,
    )


# ---------------------------------------------------------------- geometry


class DetectorFrame:
    """Per-pixel quantities for one detector geometry, shared by every shot that uses it."""

    def __init__(self, detector: str, distance: float, wavelength: float, beam_xy, beamstop=(2.0, 0.0)):
        self.model = DETECTORS[detector]
        self.panels = panel_geometries(self.model, distance, beam_xy)
        self.beam = BeamGeometry(direction=(0.0, 0.0, -1.0), wavelength=wavelength)
        self.wavelength = wavelength
        self.distance = distance
        shapes = [(p.image_size[1], p.image_size[0]) for p in self.panels]
        self.shapes = shapes
        self.offsets = np.cumsum([0] + [a * b for a, b in shapes])
        s, unit_x, unit_y, solid = [], [], [], []
        for p in self.panels:
            q = pixel_q(p, self.beam).astype(np.float32)
            s.append(np.linalg.norm(q, axis=2).ravel())
            u = q * wavelength + np.array([0, 0, -1], np.float32)  # unit s1
            unit_x.append(u[..., 0].ravel())
            unit_y.append(u[..., 1].ravel())
            normal = np.cross(p.fast, p.slow)
            r = np.abs(np.dot(p.origin, normal)) / np.abs(u @ normal.astype(np.float32))  # sample-to-pixel distance
            solid.append(((p.pixel_size[0] / 0.172) ** 2 * (200.0 / r) ** 2 * np.abs(u @ normal.astype(np.float32))).ravel())
        self.s = np.concatenate(s)
        ux2, uy2 = np.concatenate(unit_x) ** 2, np.concatenate(unit_y) ** 2
        solid = np.concatenate(solid).astype(np.float32)
        # background = (water * W + air * AIR) * (pol_a - f * pol_b): only the scale factors vary per shot
        self.pol_a = solid * (1.0 - uy2)
        self.pol_b = solid * (ux2 - uy2)
        self.water_profile = water_profile(self.s).astype(np.float32)
        self.air_profile = (1.0 / (1.0 + (self.s / 0.04) ** 2)).astype(np.float32)
        self.sensitive = np.concatenate([module_gap_mask(self.model, i).ravel() for i in range(len(self.panels))])
        self.grid_map = cached_grid_map(self.panels, self.beam, CRYSTAL_GRID)
        # detector-plane coordinates (mm, relative to the direct beam) for the beamstop shadow
        xy = []
        for p in self.panels:
            nf, ns = p.image_size
            f = (np.arange(nf) + 0.5) * p.pixel_size[0]
            sl = (np.arange(ns) + 0.5) * p.pixel_size[1]
            pos = np.asarray(p.origin)[None, None, :] + sl[:, None, None] * np.asarray(p.slow) + f[None, :, None] * np.asarray(p.fast)
            xy.append(pos[..., :2].reshape(-1, 2).astype(np.float32))
        self.xy = np.concatenate(xy)
        self.beamstop = tuple(beamstop)
        self.transmission = self.beamstop_transmission(*beamstop)

    def beamstop_transmission(self, radius, arm_angle):
        """1 outside the shadow, 0.01 inside (disc at the direct beam plus an arm to the edge)."""
        x, y = self.xy[:, 0], self.xy[:, 1]
        shadow = x * x + y * y < radius**2
        ang = np.radians(arm_angle)
        along = x * np.cos(ang) + y * np.sin(ang)
        across = -x * np.sin(ang) + y * np.cos(ang)
        shadow |= (along > 0) & (np.abs(across) < 0.6 * radius)
        return np.where(shadow, np.float32(0.01), np.float32(1.0))

    def project(self, s1_unit):
        """Ray directions (n, 3) -> (flat pixel index float coords): panel id, fast, slow; -1 panel if missed."""
        n = len(s1_unit)
        panel_id = np.full(n, -1)
        fpx = np.zeros(n)
        spx = np.zeros(n)
        for i, p in enumerate(self.panels):
            normal = np.cross(p.fast, p.slow)
            denom = s1_unit @ normal
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.dot(p.origin, normal) / denom
            hit = (t > 0) & (panel_id < 0)
            pos = s1_unit * t[:, None] - np.asarray(p.origin)
            f = pos @ np.asarray(p.fast) / p.pixel_size[0]
            sl = pos @ np.asarray(p.slow) / p.pixel_size[1]
            inside = hit & (f >= 0) & (f < p.image_size[0]) & (sl >= 0) & (sl < p.image_size[1])
            panel_id[inside], fpx[inside], spx[inside] = i, f[inside], sl[inside]
        return panel_id, fpx, spx


# ---------------------------------------------------------------- physics


def reciprocal_basis(cell):
    a, b, c, al, be, ga = cell
    al, be, ga = np.radians([al, be, ga])
    # real-space basis (a along x, b in xy plane), then its inverse transpose
    ax = np.array([a, 0, 0])
    bx = np.array([b * np.cos(ga), b * np.sin(ga), 0])
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz = np.sqrt(max(c * c - cx * cx - cy * cy, 1e-6))
    real = np.stack([ax, bx, np.array([cx, cy, cz])], axis=1)
    return np.linalg.inv(real).T, real  # columns: a*, b*, c*


def nodes_near_ewald(A, s0, s_lim, n_sigma_eps):
    """Miller indices (n, 3) and q (n, 3) of nodes within n_sigma_eps(q) of the Ewald sphere and |q| <= s_lim."""
    real_lengths = np.linalg.norm(np.linalg.inv(A).T, axis=0)  # |a|, |b|, |c|
    order = np.argsort(real_lengths)  # longest real axis last -> solved for
    i, j, k = order
    n_i = int(np.ceil(s_lim * real_lengths[i]))
    n_j = int(np.ceil(s_lim * real_lengths[j]))
    hi, hj = np.meshgrid(np.arange(-n_i, n_i + 1), np.arange(-n_j, n_j + 1), indexing="ij")
    hi, hj = hi.ravel(), hj.ravel()
    q0 = hi[:, None] * A[:, i] + hj[:, None] * A[:, j]
    ck = A[:, k]
    p = s0 + q0
    qa = ck @ ck
    qb = 2 * p @ ck
    qc = np.einsum("ij,ij->i", p, p) - s0 @ s0
    disc = qb * qb - 4 * qa * qc
    root = np.sqrt(np.maximum(disc, 0))
    t_candidates = np.stack([(-qb - root) / (2 * qa), (-qb + root) / (2 * qa)], axis=1)
    ls = np.floor(t_candidates)[:, :, None] + np.arange(-1, 3)[None, None, :]
    ls = ls.reshape(len(hi), -1)
    rows = np.repeat(np.arange(len(hi)), ls.shape[1])
    hkl = np.zeros((rows.size, 3), dtype=np.int64)
    hkl[:, i], hkl[:, j], hkl[:, k] = hi[rows], hj[rows], ls.ravel()
    key = (hkl[:, 0] + 4096) * 8192 * 8192 + (hkl[:, 1] + 4096) * 8192 + (hkl[:, 2] + 4096)
    hkl = hkl[np.unique(key, return_index=True)[1]]
    hkl = hkl[np.any(hkl != 0, axis=1)]
    q = hkl @ A.T
    s = np.linalg.norm(q, axis=1)
    eps = np.linalg.norm(s0 + q, axis=1) - np.linalg.norm(s0)
    keep = (s <= s_lim) & (np.abs(eps) <= n_sigma_eps(s))
    return hkl[keep], q[keep], eps[keep], s[keep]


def water_profile(s):
    return np.exp(-0.5 * ((s - 0.32) / 0.045) ** 2) + 0.35 * np.exp(-0.5 * ((s - 0.47) / 0.05) ** 2) + 0.25 * np.exp(-0.5 * (s / 0.12) ** 2)


def background(shot: ShotParams, frame: DetectorFrame):
    """Expected background photons per pixel: solvent, air, ice; solid angle and polarisation applied."""
    bg = np.float32(shot.water) * frame.water_profile + np.float32(shot.air) * frame.air_profile
    for strength, d in zip(shot.ice, ICE_D_SPACINGS):
        if strength > 0.01:
            near = np.abs(frame.s - 1.0 / d) < 0.01
            bg[near] += np.float32(strength) * np.exp(-0.5 * ((frame.s[near] - 1.0 / d) / 0.0015) ** 2)
    return bg * (frame.pol_a - np.float32(shot.polarization) * frame.pol_b)


@dataclass
class SimulatedImage:
    pixels: list
    valid: list
    labels: dict
    frame: DetectorFrame
    reflections: dict  # the recorded reflections the labels come from: |q| "s", expected "ios", "lattice" index


def render(shot: ShotParams, frame: DetectorFrame, noise=True) -> SimulatedImage:
    rng = np.random.default_rng([shot.seed, 1])
    model = frame.model
    s0 = np.array([0.0, 0.0, -1.0]) / shot.wavelength
    s_det_max = float(frame.s.max())
    transmission = frame.transmission
    bg = background(shot, frame) * transmission
    signal = np.zeros_like(bg)
    sigma_px = max(shot.spot_sigma_mm / model.pixel_size, 0.5)
    half = int(np.ceil(3 * sigma_px))
    a_eff = 4 * np.pi * sigma_px**2
    eta = np.radians(np.hypot(shot.mosaic_deg, shot.divergence_deg)) / 2.355

    def sigma_eps(s):
        return np.sqrt((s * eta) ** 2 + (shot.bandwidth / 2.355 * s * s * shot.wavelength / 2) ** 2 + (0.5 / shot.domain_size) ** 2)

    refl_s, refl_ios, refl_lattice = [], [], []
    valid_flat = frame.sensitive.copy()
    for li, lat in enumerate(shot.lattices):
        B, real = reciprocal_basis(lat.cell)
        A = np.asarray(lat.U).reshape(3, 3) @ B
        v_cell = abs(np.linalg.det(real))
        hkl, q, eps, s = nodes_near_ewald(A, s0, s_det_max, lambda s: 3.0 * sigma_eps(s))
        if len(s) == 0:
            continue
        partiality = np.exp(-0.5 * (eps / sigma_eps(s)) ** 2)
        f2 = np.random.default_rng([shot.seed, 2, li]).exponential(1.0, len(s))  # acentric Wilson
        s1 = s0 + q
        s1_unit = s1 / np.linalg.norm(s1, axis=1, keepdims=True)
        pol = 1.0 - (shot.polarization * s1_unit[:, 0] ** 2 + (1 - shot.polarization) * s1_unit[:, 1] ** 2)
        intensity = shot.exposure * lat.scale * (1e7 / v_cell) * f2 * np.exp(-0.5 * shot.b_factor * s * s) * pol * partiality
        panel_id, fpx, spx = frame.project(s1_unit)
        on = panel_id >= 0
        if not on.any():
            continue
        intensity, fpx, spx, panel_id, s, partiality = intensity[on], fpx[on], spx[on], panel_id[on], s[on], partiality[on]
        centre = frame.offsets[panel_id] + np.floor(spx).astype(np.int64) * np.array([frame.shapes[p][1] for p in panel_id]) + np.floor(fpx).astype(np.int64)
        # photons into a (2 half + 1)^2 window, Gaussian weights normalised per spot
        d = np.arange(-half, half + 1)
        df, ds = np.meshgrid(d, d)
        fi = np.floor(fpx)[:, None] + df.ravel()[None, :]
        si = np.floor(spx)[:, None] + ds.ravel()[None, :]
        w = np.exp(-0.5 * (((fi + 0.5 - fpx[:, None]) ** 2 + (si + 0.5 - spx[:, None]) ** 2) / sigma_px**2))
        nf = np.array([frame.shapes[p][1] for p in panel_id])[:, None]
        ns = np.array([frame.shapes[p][0] for p in panel_id])[:, None]
        inside = (fi >= 0) & (fi < nf) & (si >= 0) & (si < ns)
        w = np.where(inside, w, 0.0)
        w /= w.sum(axis=1, keepdims=True)
        flat = (frame.offsets[panel_id][:, None] + si * nf + fi).astype(np.int64)
        signal += np.bincount(flat[inside], weights=(w * intensity[:, None])[inside], minlength=signal.size).astype(np.float32)
        # expected photons of the recorded spot and the label quantities
        spot_photons = intensity * transmission[centre]
        b_here = bg[centre] + shot.readout**2
        ios = spot_photons / np.sqrt(spot_photons + a_eff * b_here + 1e-12)
        recorded = (partiality >= MIN_PARTIALITY) & valid_flat[centre] & (transmission[centre] > 0.5)
        refl_s.append(s[recorded])
        refl_ios.append(ios[recorded])
        refl_lattice.append(np.full(int(recorded.sum()), li))

    expected = bg + signal
    pixels_flat, valid_flat = detector_response(expected, shot, frame, rng, noise, valid_flat)
    reflections = {"s": np.concatenate(refl_s) if refl_s else np.zeros(0),
                   "ios": np.concatenate(refl_ios) if refl_ios else np.zeros(0),
                   "lattice": np.concatenate(refl_lattice) if refl_lattice else np.zeros(0, int)}
    labels = make_labels(shot, reflections, s_det_max)
    pixels, valid = [], []
    for i, (ns_, nf_) in enumerate(frame.shapes):
        a, b = frame.offsets[i], frame.offsets[i + 1]
        panel, ok = pixels_flat[a:b].reshape(ns_, nf_), valid_flat[a:b].reshape(ns_, nf_)
        ok[isolated_overloads(panel, ok, model.trusted_range[1])] = False  # as images.read_image does
        pixels.append(panel)
        valid.append(ok)
    return SimulatedImage(pixels=pixels, valid=valid, labels=labels, frame=frame, reflections=reflections)


def detector_response(expected, shot, frame, rng, noise, sensitive):
    """Expected photons -> recorded values (ADU) and the trusted-pixel mask a reader would derive."""
    model = frame.model
    if noise:  # torch's float32 Poisson sampler is ~1.5x numpy's float64 one; seeded from the shot
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        photons = torch.poisson(torch.from_numpy(np.ascontiguousarray(expected, np.float32)), generator=generator).numpy()
    else:
        photons = expected.astype(np.float32)
    if model.counting:
        values = photons
    else:
        values = shot.gain * photons + shot.offset
        if noise:
            values += rng.normal(0.0, shot.readout * shot.gain, values.size).astype(np.float32)
    lo, hi = model.trusted_range
    values = np.minimum(values, hi)
    n = values.size
    hot = rng.integers(0, n, rng.binomial(n, 3e-5))
    dead = rng.integers(0, n, rng.binomial(n, 2e-4))
    values[hot] = hi
    valid = sensitive.copy()
    valid[dead] = False
    values[~valid] = model.dead_value
    valid &= values > lo
    if model.name == "rayonix340":
        values = np.maximum(values, 0.0)
    return values, valid


def make_labels(shot, reflections, s_det_max):
    s, ios, lat = reflections["s"], reflections["ios"], reflections["lattice"]
    detectable = ios >= DETECTABLE_IOS
    n_det = int(detectable.sum())
    per_lattice = np.array([int((detectable & (lat == i)).sum()) for i in range(len(shot.lattices))])
    shares = per_lattice / max(n_det, 1)
    present = (shares >= MULTI_MIN_SHARE) & (per_lattice >= MULTI_MIN_SPOTS)
    is_hit = n_det >= HIT_MIN_SPOTS
    s_min, edge_limited = resolution_label(s, ios) if is_hit else (0.0, False)
    if s_min > CRYSTAL_GRID.s_max:
        s_min, edge_limited = CRYSTAL_GRID.s_max, True
    misorientation = float("nan")
    if len(shot.lattices) > 1:
        U0, U1 = (np.asarray(shot.lattices[i].U).reshape(3, 3) for i in (0, 1))
        cos_angle = (np.trace(U1 @ U0.T) - 1) / 2
        misorientation = float(np.degrees(np.arccos(np.clip(cos_angle, -1, 1))))
    sorted_shares = np.sort(shares)[::-1]
    return dict(
        s_min=float(s_min),
        d_min=float(1.0 / s_min) if s_min > 0 else float("inf"),
        edge_limited=bool(edge_limited),
        is_hit=bool(is_hit),
        n_detectable=n_det,
        n_lattices=len(shot.lattices),
        lattice_shares=[float(v) for v in shares],
        is_multi=bool(is_hit and present.sum() >= 2),
        minority_share=float(sorted_shares[1]) if len(sorted_shares) > 1 else 0.0,
        misorientation_deg=misorientation,
        detector_max_s=float(s_det_max),
    )


def resolution_label(s, ios):
    """Largest |q| whose running-window mean expected I/sigma is >= IOS_THRESHOLD (see module doc)."""
    order = np.argsort(s)
    s, ios = s[order], ios[order]
    n = len(s)
    w = max(20, n // 15)
    if n < w:
        return float(s[-1]) if n and ios.mean() >= IOS_THRESHOLD else 0.0, True
    window_mean = np.convolve(ios, np.ones(w) / w, mode="valid")  # window ending at index w-1+i
    ok = np.flatnonzero(window_mean >= IOS_THRESHOLD)
    if ok.size == 0:
        return float(s[w // 2]), False
    last = ok[-1]
    edge_limited = last == len(window_mean) - 1
    return float(s[last + w - 1] if edge_limited else s[last + w // 2]), bool(edge_limited)
