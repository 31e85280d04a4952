"""The stills simulator: determinism, physics of the labels, and real DIALS on its images."""

import json
import subprocess

import numpy as np
import pytest

from dials_diffnet.images import iter_image_refs, read_image
from dials_diffnet.representation import cached_grid_map, represent
from dials_diffnet.simulate.dataset import iter_shots, read_image_labels, write_images, write_index
from dials_diffnet.simulate.stills import DetectorFrame, Recipe, render, resolution_label, sample_shot

SMALL = Recipe(detectors={"pilatus2m": 1.0}, p_blank=0.0, lattice_counts=(1.0, 0.0, 0.0))
GEOMETRY = dict(detector="pilatus2m", distance=150.0, wavelength=1.0, beam_xy=(0.3, -0.2), beamstop=(2.0, 90.0))


@pytest.fixture(scope="module")
def frame():
    return DetectorFrame(**GEOMETRY)


def dials(*args, cwd):
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_identical_seeds_identical_images(frame):
    a = render(sample_shot(11, SMALL, GEOMETRY), frame)
    b = render(sample_shot(11, SMALL, GEOMETRY), frame)
    c = render(sample_shot(12, SMALL, GEOMETRY), frame)
    assert np.array_equal(a.pixels[0], b.pixels[0]) and json.dumps(a.labels) == json.dumps(b.labels)
    assert not np.array_equal(a.pixels[0], c.pixels[0])


def test_blank_shot_is_not_a_hit(frame):
    shot = sample_shot(3, Recipe(detectors={"pilatus2m": 1.0}, p_blank=1.0), GEOMETRY)
    image = render(shot, frame)
    assert shot.lattices == []
    assert not image.labels["is_hit"] and image.labels["s_min"] == 0.0
    # background only: the mean count follows the solvent + air model, no spots
    assert 0 < np.mean(image.pixels[0][image.valid[0]]) < 100


def test_hot_pixels_are_simulated_and_masked_as_a_reader_masks_them(frame):
    hi = frame.model.trusted_range[1]
    image = render(sample_shot(12, Recipe(detectors={"pilatus2m": 1.0}, p_blank=1.0), GEOMETRY), frame)
    overloaded = sum(int((p >= hi).sum()) for p in image.pixels)
    assert overloaded > 20  # ~3e-5 of the 3M pixels
    assert sum(int((p[v] >= hi).sum()) for p, v in zip(image.pixels, image.valid)) == 0


def test_resolution_label_follows_b_factor(frame):
    """Same crystal and exposure, stronger B-factor damping: the label resolution gets worse."""
    shot = sample_shot(21, SMALL, GEOMETRY)
    shot.exposure, shot.water = 300.0, 1.0
    s_mins = []
    for b in (10.0, 30.0, 60.0):
        shot.b_factor = b
        s_mins.append(render(shot, frame, noise=False).labels["s_min"])
    assert s_mins[0] >= s_mins[1] > s_mins[2] > 0


def test_multi_lattice_label_matches_shares():
    recipe = Recipe(detectors={"pilatus2m": 1.0}, p_blank=0.0, lattice_counts=(0.0, 0.5, 0.5))
    for _, shot, image in iter_shots(9, range(6), recipe):
        labels = image.labels
        shares = np.array(labels["lattice_shares"])
        assert len(shares) == len(shot.lattices) >= 2
        expected = labels["is_hit"] and (shares >= 0.15).sum() >= 2
        # a lattice also needs 5 detectable spots, so the label can only be stricter than shares alone
        assert labels["is_multi"] <= expected
        assert np.isfinite(labels["misorientation_deg"])


def test_labels_follow_from_the_reflections_the_image_carries():
    """`SimulatedImage.reflections` (what scripts/resolution_oracle.py reads) is what the labels were made of."""
    recipe = Recipe(detectors={"pilatus2m": 1.0}, p_blank=0.0, lattice_counts=(0.0, 1.0, 0.0))
    checked = 0
    for _, shot, image in iter_shots(9, range(4), recipe, noise=False):
        s, ios, lattice = (image.reflections[k] for k in ("s", "ios", "lattice"))
        labels = image.labels
        assert len(s) == len(ios) == len(lattice) and set(np.unique(lattice)) <= {0, 1}
        assert labels["n_detectable"] == int((ios >= 3.0).sum())
        assert s.max() <= image.frame.s.max() + 1e-9
        if labels["is_hit"] and not labels["edge_limited"]:
            assert labels["s_min"] == pytest.approx(resolution_label(s, ios)[0])
            assert s.min() < labels["s_min"] < s.max()
            checked += 1
    assert checked >= 1


@pytest.fixture(scope="module")
def single_lattice_images(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_single")
    recipe = Recipe(detectors={"pilatus2m": 1.0}, p_blank=0.0, lattice_counts=(1.0, 0.0, 0.0))
    # dataset seed 5, shot 18: tetragonal 126 x 126 x 23 A, ~2500 detectable spots
    paths = write_images(out, 5, 1, recipe, start=18)
    return out, paths


def _write_index_repeatedly(directory):
    for _ in range(300):
        write_index(directory, 1, 4, SMALL, 2)


def test_shard_workers_can_all_write_the_index(tmp_path):
    """Every worker of `diffnet.simulate nproc=N` writes the data set's index.json; with one shared temporary
    name, one worker's rename took the other's file away and the command died with a traceback."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_write_index_repeatedly, [tmp_path, tmp_path])
    assert json.loads((tmp_path / "index.json").read_text())["n_images"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_cbf_round_trip_gives_the_same_network_input(single_lattice_images):
    out, paths = single_lattice_images
    dials("dials.import", *paths, cwd=out)
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(str(out / "imported.expt"))
    ref = next(iter_image_refs(experiments))
    raw = read_image(ref.imageset, ref.index)
    from_file = represent(raw.pixels, raw.valid, cached_grid_map(raw.panels, raw.beam))
    (_, _, image), = iter_shots(5, [18], Recipe(detectors={"pilatus2m": 1.0}, p_blank=0.0, lattice_counts=(1.0, 0.0, 0.0)))
    in_memory = represent(image.pixels, image.valid, image.frame.grid_map)
    assert np.array_equal(from_file, in_memory)


def test_minicbf_is_read_by_the_pilatus_format_with_the_same_pixels(tmp_path):
    """A Pilatus miniCBF (as a beamline Pilatus writes) reads back as FormatCBFMiniPilatus: same counts,
    geometry to header precision, and a network input that differs at most in cells a pixel edge crossed."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    paths = write_images(tmp_path, 5, 1, SMALL, start=18, image_format="minicbf")
    dials("dials.import", *paths, "convert_sequences_to_stills=True", cwd=tmp_path)
    experiments = ExperimentListFactory.from_json_file(str(tmp_path / "imported.expt"))
    assert type(experiments[0].imageset.get_format_class()(paths[0])).__name__ == "FormatCBFMiniPilatus"
    ref = next(iter_image_refs(experiments))
    raw = read_image(ref.imageset, ref.index)
    (_, _, image), = iter_shots(5, [18], SMALL)
    assert np.array_equal(raw.pixels[0], np.rint(image.pixels[0]))
    assert np.array_equal(raw.valid[0], image.valid[0])
    from_file = represent(raw.pixels, raw.valid, cached_grid_map(raw.panels, raw.beam))
    in_memory = represent(image.pixels, image.valid, image.frame.grid_map)
    assert np.mean(from_file != in_memory) < 1e-3


def test_uncompressed_cbf_is_read_without_cbflib_to_the_same_values(tmp_path, frame):
    """The numpy read of an uncompressed CBF array gives what dxtbx (cbflib) gives; compressed
    files go through dxtbx; a truncated array is an error, not a short image."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.images import _plain_full_cbf, read_uncompressed_cbf
    from dials_diffnet.simulate.cbf import dxtbx_beam, write_cbf
    from dials_diffnet.simulate.detectors import to_dxtbx

    image = render(sample_shot(11, SMALL, GEOMETRY), frame)
    detector, beam = to_dxtbx(frame.model, frame.panels), dxtbx_beam(1.0)
    for name, integer, compress in (("plain.cbf", True, False), ("packed.cbf", True, True), ("real.cbf", False, False)):
        write_cbf(str(tmp_path / name), detector, beam, image.pixels, integer=integer, compress=compress)
    dials("dials.import", "plain.cbf", "packed.cbf", "convert_sequences_to_stills=True", cwd=tmp_path)
    experiments = ExperimentListFactory.from_json_file(str(tmp_path / "imported.expt"))
    plain, packed = sorted((e.imageset for e in experiments), key=lambda s: "packed" in s.get_path(0))
    assert _plain_full_cbf(plain)
    size = plain.get_detector()[0].get_image_size()
    fast = read_uncompressed_cbf(plain.get_path(0), size)
    from_cbflib = plain.get_raw_data(0)[0].as_numpy_array()
    assert fast.dtype == from_cbflib.dtype == np.int32
    assert np.array_equal(fast, from_cbflib)
    assert read_uncompressed_cbf(packed.get_path(0), size) is None
    assert np.array_equal(read_image(packed, 0).pixels[0], read_image(plain, 0).pixels[0])
    # float64 arrays (dxtbx 3.11 itself fails on them: np.float) come back as written
    real = read_uncompressed_cbf(str(tmp_path / "real.cbf"), size)
    assert real.dtype == np.float64 and np.array_equal(real, image.pixels[0].astype(np.float64))

    data = (tmp_path / "plain.cbf").read_bytes()
    (tmp_path / "plain.cbf").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        read_image(plain, 0)


def test_dials_indexes_single_lattice_and_recovers_cell(single_lattice_images):
    out, paths = single_lattice_images
    labels = read_image_labels(paths[0])
    cell = labels["params"]["lattices"][0]["cell"]
    assert labels["params"]["lattices"][0]["system"] == "tetragonal"
    dials("dials.import", *paths, cwd=out)
    dials("dials.find_spots", "imported.expt", "nproc=1", cwd=out)
    dials(
        "dials.index", "imported.expt", "strong.refl", "stills.indexer=sequences", "space_group=P4",
        "unit_cell=" + ",".join(f"{v:.1f}" for v in cell), cwd=out,
    )
    from dxtbx.model.experiment_list import ExperimentListFactory

    indexed = ExperimentListFactory.from_json_file(str(out / "indexed.expt"), check_format=False)
    found = indexed[0].crystal.get_unit_cell().parameters()
    assert np.allclose(found[:3], cell[:3], rtol=0.015)


SERIAL_CELL = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)  # lysozyme-like, tetragonal


def serial_recipe(lattice_counts):
    """Strong serial-crystallography shots of one known cell; extra lattices randomly oriented."""
    return Recipe(detectors={"pilatus2m": 1.0}, p_blank=0.0, lattice_counts=lattice_counts, p_small_misorientation=0.0,
                  unit_cell=SERIAL_CELL, crystal_system="tetragonal", exposure=(500.0, 3000.0), b_factor=(5.0, 20.0),
                  p_ice=0.0)


def lattices_found(directory, recipe):
    """dials.import + find_spots + dials.index (known symmetry, max_lattices=3) on shot 0 of data set 7."""
    directory.mkdir()
    paths = write_images(directory, 7, 1, recipe)
    dials("dials.import", *paths, cwd=directory)
    dials("dials.find_spots", "imported.expt", "nproc=1", cwd=directory)
    dials("dials.index", "imported.expt", "strong.refl", "stills.indexer=sequences", "space_group=P4",
          "unit_cell=" + ",".join(map(str, SERIAL_CELL)), "indexing.multiple_lattice_search.max_lattices=3",
          cwd=directory)
    from dxtbx.model.experiment_list import ExperimentListFactory

    indexed = ExperimentListFactory.from_json_file(str(directory / "indexed.expt"), check_format=False)
    return read_image_labels(paths[0])["labels"], indexed.crystals()


def test_dials_finds_more_lattices_on_multi_lattice_images(tmp_path):
    multi_labels, multi = lattices_found(tmp_path / "multi", serial_recipe((0.0, 0.0, 1.0)))
    single_labels, single = lattices_found(tmp_path / "single", serial_recipe((1.0, 0.0, 0.0)))
    assert multi_labels["n_lattices"] == 3 and multi_labels["is_multi"] and min(multi_labels["lattice_shares"]) > 0.25
    assert single_labels["n_lattices"] == 1 and not single_labels["is_multi"]
    assert len(multi) == 3 and len(single) == 1
    for crystal in multi + single:  # every lattice found is the simulated cell, not a spurious one
        assert np.allclose(crystal.get_unit_cell().parameters()[:3], SERIAL_CELL[:3], rtol=0.02)
    # three distinct orientations: pairwise misorientation well above refinement noise
    from scitbx import matrix

    for i in range(3):
        for j in range(i + 1, 3):
            r = matrix.sqr(multi[i].get_U()) * matrix.sqr(multi[j].get_U()).transpose()
            assert np.degrees(np.arccos(np.clip((r.trace() - 1) / 2, -1, 1))) > 5.0
