"""diffnet.predict end to end on small CBF images written here and imported with dials.import.

The helpers at the top are shared by the other command tests (imported from this module).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")

import torch  # noqa: E402
from dials.array_family import flex  # noqa: E402
from dxtbx.format.FormatCBFMini import FormatCBFMini  # noqa: E402
from dxtbx.model import BeamFactory, DetectorFactory, GoniometerFactory, ScanFactory  # noqa: E402
from dxtbx.model.experiment_list import ExperimentListFactory  # noqa: E402

from dials_diffnet.models.resnet import CrystalNet  # noqa: E402
from dials_diffnet.weights import save_model  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
IMAGE_SIZE = 256  # pixels; small images keep every command fast
TRUSTED_MAX = 60000


# --- shared helpers -----------------------------------------------------------------------------


def write_random_model(directory, planes=2) -> pathlib.Path:
    torch.manual_seed(0)
    path = pathlib.Path(directory) / "crystal.safetensors"
    card = {
        "name": "crystal",
        "version": "test",
        "architecture": {"class": "CrystalNet", "depth": 18, "width": 8, "in_channels": planes},
    }
    save_model(CrystalNet(depth=18, width=8, in_channels=planes), card, path)
    return path


def small_detector_and_beam():
    detector = DetectorFactory.simple(
        "PAD", 60.0, (IMAGE_SIZE * 0.172 / 2, IMAGE_SIZE * 0.172 / 2), "+x", "-y",
        (0.172, 0.172), (IMAGE_SIZE, IMAGE_SIZE), trusted_range=(-1, TRUSTED_MAX),
    )
    return detector, BeamFactory.simple(1.0)


def spotty_image(seed, n_spots=20):
    """Poisson background plus a few bright 3x3 spots, int32 (slow, fast)."""
    rng = np.random.default_rng(seed)
    data = rng.poisson(3, size=(IMAGE_SIZE, IMAGE_SIZE)).astype(np.int32)
    for y, x in rng.integers(10, IMAGE_SIZE - 10, size=(n_spots, 2)):
        data[y - 1 : y + 2, x - 1 : x + 2] += 400
    return data


def write_cbf(path, data, scan=None):
    detector, beam = small_detector_and_beam()
    gonio = GoniometerFactory.known_axis((1, 0, 0)) if scan is not None else None
    FormatCBFMini.as_file(detector, beam, gonio, scan, flex.int(np.ascontiguousarray(data, dtype=np.int32)), str(path))
    return pathlib.Path(path)


def write_stills(directory, images, prefix="still"):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [write_cbf(directory / f"{prefix}_{i + 1:05d}.cbf", data) for i, data in enumerate(images)]


def write_sweep(directory, images, prefix="sweep"):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(images):
        scan = ScanFactory.make_scan((i + 1, i + 1), [0.1], (i * 0.5, 0.5), {i + 1: float(i)})
        paths.append(write_cbf(directory / f"{prefix}_{i + 1:05d}.cbf", data, scan))
    return paths


def dials(cwd, program, *args):
    result = subprocess.run([program, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def dials_import(cwd, files, output="imported.expt", *extra):
    dials(cwd, "dials.import", *files, f"output.experiments={output}", *extra)
    return pathlib.Path(cwd) / output


def find_spots(cwd, expt, output="strong.refl"):
    dials(cwd, "dials.find_spots", expt, f"output.reflections={output}", "nproc=1")
    return pathlib.Path(cwd) / output


def diffnet(cwd, command, *args):
    """Run a diffnet command as a user would: the console script, in a subprocess."""
    return subprocess.run([str(BIN / f"diffnet.{command}"), *map(str, args)], cwd=cwd, capture_output=True, text=True)


def load_records(path):
    return json.loads(pathlib.Path(path).read_text())["records"]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crystal_model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    """Three spotty stills imported together (one ImageSequence, one experiment each) and their spots."""
    d = tmp_path_factory.mktemp("stills")
    files = write_stills(d, [spotty_image(i) for i in range(3)])
    expt = dials_import(d, files)
    return expt, find_spots(d, expt)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A four-image rotation sequence with spots on images 2 and 4 only."""
    d = tmp_path_factory.mktemp("sweep")
    images = [spotty_image(i, n_spots=0 if i % 2 == 0 else 15) for i in range(4)]
    expt = dials_import(d, write_sweep(d, images))
    return expt, find_spots(d, expt)


# --- tests --------------------------------------------------------------------------------------


def test_predict_stills_writes_records_table_and_unchanged_experiments(stills, crystal_model, tmp_path):
    expt, refl = stills
    result = diffnet(tmp_path, "predict", expt, refl, f"model.crystal={crystal_model}", "nproc=0")
    assert result.returncode == 0, result.stderr
    experiments = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    records = load_records(tmp_path / "diffnet.json")
    assert [r["experiment_identifier"] for r in records] == list(experiments.identifiers())
    assert [os.path.basename(r["path"]) for r in records] == [f"still_{i:05d}.cbf" for i in (1, 2, 3)]
    for r in records:
        assert r["ok"] and r["failure"] is None
        assert all(math.isfinite(r[k]) for k in ("d_min", "s_min", "p_multi", "p_hit"))
        assert r["d_min"] == pytest.approx(1 / r["s_min"])
        assert 0 <= r["p_multi"] <= 1 and 0 <= r["p_hit"] <= 1
    document = json.loads((tmp_path / "diffnet.json").read_text())
    assert document["models"]["crystal"]["version"] == "test"
    assert document["models"]["crystal"]["views"] == 2  # views=Auto for task=crystal
    assert len(document["models"]["crystal"]["sha256"]) == 64
    # experiments out unchanged in content
    written = ExperimentListFactory.from_json_file(str(tmp_path / "diffnet.expt"), check_format=False)
    assert written.to_dict() == experiments.to_dict()
    # readable table: a header plus one row per image
    table = (tmp_path / "diffnet.txt").read_text()
    assert sum("still_0000" in line for line in table.splitlines()) == 3
    assert "median d_min" in result.stdout and "hits" in result.stdout


def test_rerun_and_background_readers_give_identical_json(stills, crystal_model, tmp_path):
    expt, _ = stills
    common = [expt, f"model.crystal={crystal_model}", "output.experiments=None", "output.table=None"]
    for name, nproc, batch in (("a.json", 0, 16), ("b.json", 0, 16), ("c.json", 2, 2)):
        result = diffnet(tmp_path, "predict", *common, f"output.json={name}", f"nproc={nproc}", f"batch_size={batch}")
        assert result.returncode == 0, result.stderr
    a, b, c = ((tmp_path / n).read_text() for n in ("a.json", "b.json", "c.json"))
    assert a == b
    for x, y in zip(load_records(tmp_path / "a.json"), load_records(tmp_path / "c.json")):
        assert x["d_min"] == pytest.approx(y["d_min"], rel=1e-5)
        assert x["p_hit"] == pytest.approx(y["p_hit"], rel=1e-5)


def test_a_model_reading_the_snr_plane_gets_it_from_every_reader(stills, tmp_path):
    """The records equal the model applied here to represent(..., planes=3) of each image, and the
    SNR plane changes them: it reaches the model, in the main process and in background readers."""
    from dials_diffnet.images import iter_image_refs, read_image
    from dials_diffnet.inference import CrystalTask
    from dials_diffnet.representation import cached_grid_map, represent

    expt, _ = stills
    model = write_random_model(tmp_path, planes=3)
    common = [expt, f"model.crystal={model}", "views=1", "output.experiments=None", "output.table=None"]
    for name, nproc in (("main.json", 0), ("readers.json", 2)):
        result = diffnet(tmp_path, "predict", *common, f"output.json={name}", f"nproc={nproc}")
        assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "main.json").read_text())
    assert document["models"]["crystal"]["planes"] == 3
    task = CrystalTask(model, "cpu", views=1)
    experiments = ExperimentListFactory.from_json_file(str(expt))
    for name in ("main.json", "readers.json"):
        for record, ref in zip(load_records(tmp_path / name), iter_image_refs(experiments)):
            raw = read_image(ref.imageset, ref.index)
            x = represent(raw.pixels, raw.valid, cached_grid_map(raw.panels, raw.beam), planes=3)
            assert record["s_min"] == pytest.approx(task.predict_batch(torch.from_numpy(x[None]))[0]["s_min"], rel=1e-5)
            x[2] = 0
            assert record["s_min"] != pytest.approx(task.predict_batch(torch.from_numpy(x[None]))[0]["s_min"], rel=1e-5)


def test_views_reach_the_model_and_are_recorded(stills, crystal_model, tmp_path):
    expt, _ = stills
    common = [expt, f"model.crystal={crystal_model}", "output.experiments=None", "output.table=None", "nproc=0"]
    for views in (1, 8):
        result = diffnet(tmp_path, "predict", *common, f"views={views}", f"output.json=v{views}.json")
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / f"v{views}.json").read_text())["models"]["crystal"]["views"] == views
    one, eight = load_records(tmp_path / "v1.json"), load_records(tmp_path / "v8.json")
    assert [r["path"] for r in one] == [r["path"] for r in eight]
    assert all(0 <= r["p_hit"] <= 1 and math.isfinite(r["d_min"]) for r in eight)
    assert any(abs(a["s_min"] - b["s_min"]) > 1e-6 for a, b in zip(one, eight))


def _reloaded(path):
    return flex.reflection_table.from_file(str(path))


def test_still_reflections_carry_their_images_values(stills, crystal_model, tmp_path):
    expt, refl = stills
    result = diffnet(tmp_path, "predict", expt, refl, f"model.crystal={crystal_model}", "nproc=0")
    assert result.returncode == 0, result.stderr
    reflections = _reloaded(tmp_path / "diffnet.refl")
    assert len(reflections) == len(_reloaded(refl)) > 10
    records = load_records(tmp_path / "diffnet.json")
    for column in ("diffnet_d_min", "diffnet_p_multi", "diffnet_p_hit"):
        assert isinstance(reflections[column], flex.double)
    assert isinstance(reflections["diffnet_ok"], flex.int)
    ids = list(reflections["id"])
    assert set(ids) == {0, 1, 2}
    for i, d_min, ok in zip(ids, reflections["diffnet_d_min"], reflections["diffnet_ok"]):
        assert d_min == pytest.approx(records[i]["d_min"]) and ok == 1


def test_rotation_reflections_take_the_value_of_their_frame(sweep, crystal_model, tmp_path):
    expt, refl = sweep
    result = diffnet(tmp_path, "predict", expt, refl, f"model.crystal={crystal_model}", "nproc=0")
    assert result.returncode == 0, result.stderr
    records = load_records(tmp_path / "diffnet.json")
    assert [r["image_index"] for r in records] == [0, 1, 2, 3]
    assert {r["experiment_index"] for r in records} == {0}
    reflections = _reloaded(tmp_path / "diffnet.refl")
    assert len(reflections) > 5
    z = reflections["xyzobs.px.value"].parts()[2]
    for frame, p_hit in zip(z, reflections["diffnet_p_hit"]):
        assert p_hit == pytest.approx(records[int(frame)]["p_hit"])
    frames = {int(f) for f in z}
    assert frames <= {1, 3}, "spots were put on images 2 and 4 only"
    # the images differ, so the mapping is tested, not one shared value
    assert len({records[f]["p_hit"] for f in frames}) == len(frames)
