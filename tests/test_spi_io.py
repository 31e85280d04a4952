"""SPI files: CXI write/read round trip, and mini-CBF files imported by real dials.import."""

import json
import subprocess

import h5py
import numpy as np
import pytest
import torch

from dials_diffnet.representation import cached_grid_map, represent
from dials_diffnet.spi import SPI_GRID
from dials_diffnet.spi import simulate as sim
from dials_diffnet.spi.cxi import read_cxi, read_cxi_labels, write_cbf, write_cxi, write_cxi_frames

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shots():
    # two geometries from the test pool, so per-shot geometry is exercised
    return [sim.simulate(sim.shot_params(seed, "groel", 1 + seed % 4, "noisy", "test")) for seed in (1, 2, 3)]


def test_cxi_round_trip(tmp_path, shots):
    path = write_cxi(tmp_path / "shots.cxi", shots)
    with h5py.File(path) as f:
        assert f["entry_1/data_1/data"].shape == (3, 1056, 1024)
        assert f["entry_1/instrument_1/source_1/energy"].attrs["units"] == "J"
    images = list(read_cxi(path))
    assert len(images) == 3
    for shot, raw in zip(shots, images):
        assert raw.panels == (shot.panel,) and raw.beam.wavelength == pytest.approx(shot.beam.wavelength, rel=1e-12)
        assert np.array_equal(raw.pixels[0], shot.image) and np.array_equal(raw.valid[0], shot.valid)
        x = represent(raw.pixels, raw.valid, cached_grid_map(raw.panels, raw.beam, SPI_GRID))
        assert np.array_equal(x, sim.represent_shot(shot))
    labels = read_cxi_labels(path)
    assert list(labels["count"]) == [s.params.count for s in shots]
    assert list(labels["particle"]) == ["groel"] * 3
    again = sim.simulate(sim.shot_params(int(labels["seed"][1]), str(labels["particle"][1]), int(labels["count"][1]),
                                         str(labels["noise"][1]), str(labels["pool"][1])))
    assert np.array_equal(again.image, images[1].pixels[0])  # regenerable from the stored labels
    assert np.allclose(labels["offsets"][0][: shots[0].params.count], shots[0].params.offsets)


def test_a_cxi_copy_of_some_frames_holds_their_pixels_geometry_and_labels(tmp_path, shots):
    path = write_cxi(tmp_path / "shots.cxi", shots, user_labels=["a", "b", "c"])
    write_cxi_frames(path, tmp_path / "two.cxi", [0, 2])
    images = list(read_cxi(tmp_path / "two.cxi"))
    assert len(images) == 2
    for shot, raw in zip([shots[0], shots[2]], images):  # per-shot geometry sliced with the frames
        assert raw.panels == (shot.panel,) and raw.beam.wavelength == pytest.approx(shot.beam.wavelength, rel=1e-12)
        assert np.array_equal(raw.pixels[0], shot.image) and np.array_equal(raw.valid[0], shot.valid)
    labels = read_cxi_labels(tmp_path / "two.cxi")
    assert list(labels["seed"]) == [1, 3] and list(labels["label"]) == ["a", "c"] and labels["rotations"].shape[0] == 2
    with h5py.File(tmp_path / "two.cxi") as f:
        assert f["entry_1/instrument_1/source_1/energy"].attrs["units"] == "J"
        assert isinstance(f["entry_1/data_1"].get("data", getlink=True), h5py.SoftLink)
    write_cxi_frames(path, tmp_path / "none.cxi", [])  # nothing kept: a valid file with no frames
    assert list(read_cxi(tmp_path / "none.cxi")) == []


def test_read_cxi_rejects_non_cxi(tmp_path):
    bad = tmp_path / "bad.cxi"
    bad.write_text("not hdf5")
    with pytest.raises(OSError, match="not a readable HDF5"):
        list(read_cxi(bad))
    with h5py.File(tmp_path / "empty.cxi", "w") as f:
        f["x"] = 1
    with pytest.raises(KeyError, match="lacks CXI item"):
        list(read_cxi(tmp_path / "empty.cxi"))


def test_cbf_files_import_with_dials(tmp_path, shots):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.images import iter_image_refs, read_image

    for shot in shots:
        write_cbf(tmp_path / f"spi_{shot.params.seed:04d}.cbf", shot)
    subprocess.run(["dials.import", *sorted(p.name for p in tmp_path.glob("*.cbf"))], cwd=tmp_path, check=True,
                   capture_output=True)
    experiments = ExperimentListFactory.from_json_file(str(tmp_path / "imported.expt"))
    refs = list(iter_image_refs(experiments))
    assert len(refs) == 3
    for shot, ref in zip(shots, refs):
        raw = read_image(ref.imageset, ref.index)
        assert np.array_equal(raw.valid[0], shot.valid)
        x = represent(raw.pixels, raw.valid, cached_grid_map(raw.panels, raw.beam, SPI_GRID))
        # the dxtbx path gives the same network input, up to the mini-CBF header's 6-digit wavelength,
        # which moves the odd pixel on a cell boundary into the neighbouring cell
        assert (x != sim.represent_shot(shot)).sum() <= 8
        assert np.abs(x).max() > 1.0
        labels = json.loads(tmp_path.joinpath(f"spi_{shot.params.seed:04d}.json").read_text())
        assert labels["count"] == shot.params.count and labels["seed"] == shot.params.seed
