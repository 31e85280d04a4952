"""diffnet.predict task=spi on CXI files and on dials.import'ed images, and diffnet.filter keeping single hits."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from dials_diffnet.spi.cxi import read_cxi_labels, write_cbf, write_cxi
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
    blank = simulate(shot_params(9_100_011, count=0, noise="noisy", pool="test", readout_sigma=0.3))
    paths = [write_cbf(tmp_path / f"spi_{i + 1:05d}.cbf", shot) for i, shot in enumerate(shots + [blank])]
    run("dials.import", *[p.name for p in map(__import__("pathlib").Path, paths)], cwd=tmp_path)
    run("diffnet.predict", "imported.expt", "task=spi", cwd=tmp_path)
    document = json.loads((tmp_path / "diffnet.json").read_text())
    records, bar = document["records"], document["models"]["spi_multi"]["min_p_hit"]
    assert len(records) == 5 and all(r["ok"] for r in records)
    assert records[-1]["p_hit"] < bar  # the blank frame
    run("diffnet.filter", "imported.expt", "diffnet.json", "task=spi", cwd=tmp_path)
    from dxtbx.model.experiment_list import ExperimentListFactory

    kept = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)
    singles = {r["path"] for r in records if r["spi_count"] == 1 and r["p_hit"] >= bar}
    assert {e.imageset.get_path(0) for e in kept} == singles and len(singles) >= 2


def test_blank_frames_are_not_hits_and_all_zero_frames_fail(tmp_path, shots):
    """A real SPI run is mostly blanks: the shipped spi_multi's hit head calls a noise-only frame no hit,
    an all-zero frame is flagged before any network sees it, and the table shows the SPI columns."""
    blank = simulate(shot_params(9_100_010, count=0, noise="noisy", pool="test", readout_sigma=0.3))
    zero = dataclasses.replace(blank, image=np.zeros_like(blank.image))
    write_cxi(tmp_path / "run.cxi", [shots[0], blank, zero])
    run(sys.executable, "-m", "diffnet.predict", "run.cxi", "task=spi", cwd=tmp_path)
    document = json.loads((tmp_path / "diffnet.json").read_text())
    hit, noise_only, empty = document["records"]
    bar = document["models"]["spi_multi"]["min_p_hit"]
    assert hit["ok"] and hit["p_hit"] >= bar and noise_only["ok"] and noise_only["p_hit"] < bar
    assert not empty["ok"] and empty["failure"] == "all pixels are zero"
    header = [cell.strip() for cell in (tmp_path / "diffnet.txt").read_text().splitlines()[1].split("|")]
    assert {"P(hit)", "count", "P(single)", "type"} <= set(header) and "d_min" not in header
    # the filter on the CXI file: a copy holding the single hits only
    run(sys.executable, "-m", "diffnet.filter", "run.cxi", "diffnet.json", "task=spi", cwd=tmp_path)
    kept = read_cxi_labels(tmp_path / "filtered.cxi")["seed"]
    assert list(kept) == [s.params.seed for s, r in zip([shots[0], blank, zero], document["records"])
                          if r["ok"] and r["spi_count"] == 1 and r["p_hit"] >= bar]
    write_cxi(tmp_path / "other.cxi", shots[:2])  # records of another file are refused
    result = run(sys.executable, "-m", "diffnet.filter", "other.cxi", "diffnet.json", "task=spi",
                 "output.cxi=other_kept.cxi", cwd=tmp_path, ok=False)
    assert "does not hold the records" in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_filter_gives_each_kept_still_its_own_image_of_a_shared_image_sequence(tmp_path):
    """dials.import groups consecutive mini-CBFs of one geometry into an ImageSequence whose array range can
    start past 0; each kept still must get exactly its own image (this crashed until session 31)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    seeds = (9_100_102, 9_100_103, 9_100_104)  # 4.0 keV, then two at 1.4 keV: the second sequence starts at 1
    for i, seed in enumerate(seeds):
        write_cbf(tmp_path / f"seq_{i + 1:05d}.cbf", simulate(shot_params(seed, "capsid", 1, "clean", "test")))
    run("dials.import", "seq_00001.cbf", "seq_00002.cbf", "seq_00003.cbf", cwd=tmp_path)
    imported = ExperimentListFactory.from_json_file(str(tmp_path / "imported.expt"), check_format=False)
    assert imported[2].imageset.get_array_range()[0] == 1  # the case this test is for
    run("diffnet.filter", "imported.expt", "task=spi", "spi.single_only=False", "min_p_hit=None", cwd=tmp_path)
    kept = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)
    assert [len(e.imageset) for e in kept] == [1, 1, 1]
    assert [e.imageset.get_path(0).rsplit("/", 1)[-1] for e in kept] == ["seq_00001.cbf", "seq_00002.cbf",
                                                                          "seq_00003.cbf"]


def test_cxi_needs_task_spi(tmp_path, shots):
    write_cxi(tmp_path / "run.cxi", shots[:1])
    result = run(sys.executable, "-m", "diffnet.predict", "run.cxi", cwd=tmp_path, ok=False)
    assert "Sorry" in result.stdout + result.stderr and "Traceback" not in result.stderr
