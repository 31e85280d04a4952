"""NeXus (NXmx HDF5), the format of Eiger detectors at SSX beamlines: many stills in one file.

Simulated stills written both as NXmx and as CBF go through real dials.import, dials.find_spots,
diffnet.predict, diffnet.filter and diffnet.evaluate."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from dials_diffnet.images import iter_image_refs, read_image
from dials_diffnet.representation import cached_grid_map, represent
from dials_diffnet.simulate.dataset import iter_shots, read_image_labels
from dials_diffnet.simulate.detectors import to_dxtbx
from dials_diffnet.simulate.nexus import PIXEL_MASK_GAP, PIXEL_MASK_HOT, write_nexus
from dials_diffnet.simulate.stills import Recipe
from dials_diffnet.weights import shipped_path

# 6 Eiger 4M stills of data set 3, 3 to a file: 4 hits (20-239 detectable spots) and 2 shots without one
SIMULATION = ("n_images=6", "seed=3", "recipe.detectors=eiger4m", "recipe.images_per_geometry=3", "recipe.p_blank=0.34")
RECIPE = Recipe(detectors={"eiger4m": 1.0}, images_per_geometry=3, p_blank=0.34)


def run(*args, cwd):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def load(path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_json_file(str(path))


def records_of(path):
    return json.loads(path.read_text())["records"]


def outputs(stem):
    return [f"output.{k}={stem}.{ext}" for k, ext in
            (("experiments", "expt"), ("reflections", "refl"), ("json", "json"), ("table", "txt"), ("log", "log"))]


@pytest.fixture(scope="module")
def nexus_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("nexus")
    for fmt in ("nexus", "cbf"):
        run(sys.executable, "-m", "diffnet.simulate", f"format={fmt}", *SIMULATION, f"output.directory={fmt}",
            "output.log=None", cwd=d)
    run("dials.import", *sorted(str(p) for p in (d / "nexus").glob("shots_*.nxs")), "output.experiments=nx.expt", cwd=d)
    run("dials.import", *sorted(str(p) for p in (d / "cbf").glob("shot_*.cbf")), "output.experiments=cbf.expt", cwd=d)
    run("dials.find_spots", "nx.expt", "nproc=1", "output.reflections=nx_strong.refl", cwd=d)
    return d


@pytest.fixture(scope="module")
def predicted(nexus_run):
    if not shipped_path("crystal").exists():
        pytest.skip("no shipped crystal model")
    d = nexus_run
    run("diffnet.predict", "nx.expt", "nx_strong.refl", *outputs("nx_diffnet"), cwd=d)
    run("diffnet.predict", "cbf.expt", *outputs("cbf_diffnet"), cwd=d)
    run("diffnet.filter", "nx.expt", "nx_strong.refl", "nx_diffnet.json", "min_p_hit=0.5",
        "output.experiments=kept.expt", "output.reflections=kept.refl", "output.log=None", cwd=d)
    return d


def test_nxmx_files_import_as_stills_with_the_simulated_geometry_and_gap_mask(nexus_run):
    with h5py.File(nexus_run / "nexus" / "shots_00001.nxs") as f:  # compressed as an Eiger compresses
        assert "32008" in f["/entry/data/data"]._filters and f["/entry/data/data"].shape[0] == 3
    experiments = load(nexus_run / "nx.expt")
    refs = list(iter_image_refs(experiments))
    assert len(experiments) == 6 and all(e.scan is None and e.goniometer is None for e in experiments)
    assert [(r.path.rsplit("/", 1)[1], r.image_number) for r in refs] == [
        (f"shots_{g:05d}.nxs", k) for g in (1, 2) for k in (1, 2, 3)]
    for ref, (i, shot, image) in zip(refs, iter_shots(3, range(6), RECIPE)):
        expected = to_dxtbx(image.frame.model, image.frame.panels)[0]
        panel = experiments[ref.experiment_index].detector[0]
        assert np.allclose(panel.get_origin(), expected.get_origin(), atol=1e-9)
        assert np.allclose(panel.get_fast_axis() + panel.get_slow_axis(), expected.get_fast_axis() + expected.get_slow_axis())
        assert panel.get_pixel_size() == expected.get_pixel_size() and panel.get_image_size() == expected.get_image_size()
        assert experiments[ref.experiment_index].beam.get_wavelength() == pytest.approx(shot.wavelength, rel=1e-12)
        raw = read_image(ref.imageset, ref.index)
        assert np.array_equal(raw.pixels[0], np.rint(image.pixels[0]))
        assert np.array_equal(raw.valid[0], image.valid[0])
        gaps = ~image.frame.sensitive.reshape(raw.valid[0].shape)
        assert gaps.sum() > 100_000 and not raw.valid[0][gaps].any()


def test_the_pixel_mask_of_a_nexus_file_keeps_flagged_hot_pixels_out_of_the_network_input(tmp_path):
    """A detector flags hot pixels in pixel_mask and leaves their counts in the data: the reader must drop them."""
    (_, shot, image), = iter_shots(3, [0], RECIPE)
    frame = image.frame
    detector = to_dxtbx(frame.model, frame.panels)
    shape = image.pixels[0].shape
    gaps = np.where(frame.sensitive.reshape(shape), 0, PIXEL_MASK_GAP).astype(np.uint32)
    hot = np.zeros(shape, bool)
    hot[1200:1203, 700:703] = True  # a 3x3 block: not the lone overload the reader drops by itself
    assert image.valid[0][hot].all()
    with_hot = np.where(hot, detector[0].get_trusted_range()[1], image.pixels[0])
    inputs = {}
    for name, pixels, mask in (("clean", image.pixels[0], gaps), ("flagged", with_hot, gaps | np.where(hot, PIXEL_MASK_HOT, 0)),
                               ("unflagged", with_hot, gaps)):
        write_nexus(tmp_path / f"{name}.nxs", detector, [(shot.wavelength, pixels)], pixel_mask=mask)
        run("dials.import", f"{name}.nxs", f"output.experiments={name}.expt", cwd=tmp_path)
        raw = read_image(load(tmp_path / f"{name}.expt")[0].imageset, 0)
        inputs[name] = (raw.valid[0], represent(raw.pixels, raw.valid, cached_grid_map(raw.panels, raw.beam)))
    assert not inputs["flagged"][0][hot].any() and inputs["unflagged"][0][hot].all()
    assert np.array_equal(inputs["flagged"][1][0], inputs["clean"][1][0])
    assert not np.array_equal(inputs["unflagged"][1][0], inputs["clean"][1][0])


def test_the_same_shots_as_nexus_and_as_cbf_get_the_same_verdicts(predicted):
    nexus, cbf = records_of(predicted / "nx_diffnet.json"), records_of(predicted / "cbf_diffnet.json")
    assert len(nexus) == len(cbf) == 6 and all(r["ok"] for r in nexus + cbf)
    for a, b in zip(nexus, cbf):
        for field in ("d_min", "p_hit", "p_multi"):
            assert a[field] == pytest.approx(b[field], rel=1e-6, abs=1e-6), (a["path"], a["image_number"], field)
    assert [r["image_number"] for r in nexus] == [1, 2, 3, 1, 2, 3]


def test_filter_keeps_the_right_frames_of_a_nexus_file_and_dials_reads_only_those(predicted):
    """Kept stills point at their own frame inside the shared file; spot finding on the filtered list
    sees exactly those frames, with the spots it found on them before filtering."""
    from dials.array_family import flex

    d = predicted
    records = records_of(d / "nx_diffnet.json")
    passing = [(r["path"], r["image_number"]) for r in records if r["p_hit"] >= 0.5]
    assert 0 < len(passing) < len(records)
    kept = load(d / "kept.expt")
    kept_frames = [(ref.path, ref.image_number) for ref in iter_image_refs(kept)]
    assert kept_frames == passing
    originals = {(ref.path, ref.image_number): ref for ref in iter_image_refs(load(d / "nx.expt"))}
    for ref in iter_image_refs(kept):
        original = originals[(ref.path, ref.image_number)]
        assert np.array_equal(read_image(ref.imageset, ref.index).pixels[0],
                              read_image(original.imageset, original.index).pixels[0])

    strong = flex.reflection_table.from_file(str(d / "nx_strong.refl"))
    kept_refl = flex.reflection_table.from_file(str(d / "kept.refl"))
    assert kept_refl.are_experiment_identifiers_consistent(kept)
    run("dials.find_spots", "kept.expt", "nproc=1", "output.reflections=kept_strong.refl", cwd=d)
    again = flex.reflection_table.from_file(str(d / "kept_strong.refl"))
    before = [int((strong["id"] == originals[frame].experiment_index).count(True)) for frame in kept_frames]
    after = [int((again["id"] == i).count(True)) for i in range(len(kept))]
    assert after == before and sum(after) > 0


def test_evaluate_takes_each_frames_labels_and_dials_verdict_from_inside_the_file(predicted):
    from dials.array_family import flex

    from dials_diffnet.evaluate import evaluate_records

    metrics, rows = evaluate_records(predicted / "nx_diffnet.json", with_dials=True)
    strong = flex.reflection_table.from_file(str(predicted / "nx_strong.refl"))
    for i, row in enumerate(rows):
        labels = read_image_labels(row["path"], row["image_number"])
        assert labels["image_number"] == row["image_number"] and labels["index"] == i
        assert row["label_d_min"] == labels["labels"]["d_min"]
        assert row["dials_n_spots"] == int((strong["id"] == i).count(True))
    assert sum(row["label_is_hit"] for row in rows) == 4
    assert metrics["hit"]["accuracy"] >= 5 / 6


def test_readers_open_each_nexus_file_once_and_keep_each_stills_own_models(nexus_run, tmp_path):
    """dials.import writes an ImageSet per frame; the readers merge a file's frames into one ImageSet
    (one format instance instead of one per still), with each still's beam and detector as its
    experiment states them (here one still's wavelength overridden, as an import-time override does)."""
    from dials_diffnet.inference import _image_sources

    document = json.loads((nexus_run / "nx.expt").read_text())
    assert len(document["imageset"]) == 6
    document["beam"].append(dict(document["beam"][document["experiment"][4]["beam"]], wavelength=0.9876))
    document["experiment"][4]["beam"] = len(document["beam"]) - 1
    modified = tmp_path / "modified.expt"
    modified.write_text(json.dumps(document))

    sources = _image_sources(modified)
    per_still = list(iter_image_refs(load(nexus_run / "nx.expt")))
    assert len({id(imageset) for imageset, _ in sources}) == 2  # one per file
    assert [frame for _, frame in sources] == [0, 1, 2, 0, 1, 2]
    for k, ((imageset, frame), ref) in enumerate(zip(sources, per_still)):
        expected = 0.9876 if k == 4 else ref.imageset.get_beam(ref.index).get_wavelength()
        assert imageset.get_beam(frame).get_wavelength() == pytest.approx(expected, rel=1e-12)
        assert imageset.get_detector(frame) == ref.imageset.get_detector(ref.index)
        assert np.array_equal(read_image(imageset, frame).pixels[0], read_image(ref.imageset, ref.index).pixels[0])
