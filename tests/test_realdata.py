"""Every real detector image in shared/realdata goes through diffnet.predict to a finite prediction."""

from __future__ import annotations

import math
import pathlib

import pytest
from dxtbx.model.experiment_list import ExperimentListFactory
from test_predict import crystal_model, diffnet, dials_import, load_records  # noqa: F401

from conftest import realdata_files


@pytest.fixture(scope="module")
def realdata_predictions(tmp_path_factory, crystal_model):  # noqa: F811
    files = realdata_files()
    if not files:
        pytest.skip("shared/realdata not present")
    d = tmp_path_factory.mktemp("realdata")
    images = [str(p) for f in files for p in (sorted(f.iterdir()) if f.is_dir() else [f])]
    expt = dials_import(d, images)
    result = diffnet(d, "predict", expt, f"model.crystal={crystal_model}", "nproc=1", "batch_size=4")
    assert result.returncode == 0, result.stderr
    experiments = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    return images, experiments, load_records(d / "diffnet.json")


def test_every_real_image_gets_a_finite_prediction(realdata_predictions):
    images, _, records = realdata_predictions
    assert sorted(r["path"] for r in records) == sorted(images)
    for r in records:
        assert r["ok"], (r["path"], r["failure"])
        assert all(math.isfinite(r[k]) for k in ("d_min", "s_min", "p_multi", "p_hit")), r


@pytest.mark.parametrize("name, panels", [("idx-s00", 64), ("P12M", 24)])
def test_multi_panel_detectors(realdata_predictions, name, panels):
    _, experiments, records = realdata_predictions
    (record,) = [r for r in records if name in pathlib.Path(r["path"]).name]
    assert len(experiments[record["experiment_index"]].detector) == panels
    assert record["ok"] and math.isfinite(record["d_min"])
