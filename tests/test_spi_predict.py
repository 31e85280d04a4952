"""diffnet.predict task=spi on CXI files and on dials.import'ed images, and diffnet.filter keeping single hits."""

import json
import subprocess
import sys

import pytest

from dials_diffnet.spi.cxi import write_cbf, write_cxi
from dials_diffnet.spi.simulate import shot_params, simulate

# seeds far from the SPI training and test seeds; counts 1, 2, 1, 3
SHOTS = [(9_100_001, 1), (9_100_002, 2), (9_100_003, 1), (9_100_004, 3)]


def run(*args, cwd, ok=True):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert (result.returncode == 0) == ok, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def shots():
    return [simulate(shot_params(seed, particle="capsid", count=count, noise="clean", pool="test")) for seed, count in SHOTS]


def test_predict_spi_on_cxi(tmp_path, shots):
    write_cxi(tmp_path / "run.cxi", shots)
    run(sys.executable, "-m", "diffnet.predict", "run.cxi", "task=spi", cwd=tmp_path)
    records = json.loads((tmp_path / "diffnet.json").read_text())["records"]
    assert [r["image_number"] for r in records] == [1, 2, 3, 4]
    assert all(r["ok"] and r["spi_count"] in (1, 2, 3, 4) and 0 <= r["spi_p_single"] <= 1 for r in records)
    # single vs multiple particles is what SPI users filter on
    assert sum((r["spi_count"] == 1) == (count == 1) for r, (_, count) in zip(records, SHOTS)) >= 3


def test_predict_spi_on_imported_images_and_filter_keeps_single_hits(tmp_path, shots):
    paths = [write_cbf(tmp_path / f"spi_{i + 1:05d}.cbf", shot) for i, shot in enumerate(shots)]
    run("dials.import", *[p.name for p in map(__import__("pathlib").Path, paths)], cwd=tmp_path)
    run("diffnet.predict", "imported.expt", "task=spi", cwd=tmp_path)
    records = json.loads((tmp_path / "diffnet.json").read_text())["records"]
    assert len(records) == 4 and all(r["ok"] for r in records)
    run("diffnet.filter", "imported.expt", "diffnet.json", "task=spi", cwd=tmp_path)
    from dxtbx.model.experiment_list import ExperimentListFactory

    kept = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)
    singles = {r["path"] for r in records if r["spi_count"] == 1}
    assert {e.imageset.get_path(0) for e in kept} == singles


def test_cxi_needs_task_spi(tmp_path, shots):
    write_cxi(tmp_path / "run.cxi", shots[:1])
    result = run(sys.executable, "-m", "diffnet.predict", "run.cxi", cwd=tmp_path, ok=False)
    assert "Sorry" in result.stdout + result.stderr and "Traceback" not in result.stderr
