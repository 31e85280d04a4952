"""Every real detector image in shared/realdata goes through diffnet.predict to a finite prediction."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from dxtbx.model.experiment_list import ExperimentListFactory
from dials_diffnet.representation import CRYSTAL_GRID
from test_predict import crystal_model, diffnet, dials_import, find_spots, load_records  # noqa: F401

from conftest import realdata_files


def image_paths(files):
    """Every image file of `realdata_files()` entries (a directory gives its frames in order)."""
    return [str(p) for f in files for p in (sorted(f.iterdir()) if f.is_dir() else [f])]


@pytest.fixture(scope="module")
def realdata_predictions(tmp_path_factory, crystal_model):  # noqa: F811
    files = realdata_files()
    if not files:
        pytest.skip("shared/realdata not present")
    d = tmp_path_factory.mktemp("realdata")
    images = image_paths(files)
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


# DIALS spot counts that leave no doubt: a hit by any reading of the hit label (>= 10 detectable
# spots), or close to blank. Images in between (the l-cysteine frame with 10 spots) are not judged.
CLEAR_HIT_SPOTS, CLEAR_MISS_SPOTS = 50, 5


@pytest.fixture(scope="module")
def shipped_model_against_dials(tmp_path_factory):
    """The shipped crystal model's records and DIALS's view of the same real images: per-image
    spot counts (`dials_baseline`) and, per experiment, the resolution d of every strong spot.

    The CSPAD still is left out of the DIALS side: dials.find_spots at its default gain rejects
    its float pixels (more strong pixels than it allows), so DIALS gives no count to compare.
    """
    from dials.array_family import flex
    from dials_diffnet.evaluate import dials_baseline

    files = [f for f in realdata_files() if not f.name.startswith("idx-s00")]
    if not files:
        pytest.skip("shared/realdata not present")
    d = tmp_path_factory.mktemp("realdata_shipped")
    images = image_paths(files)
    expt = dials_import(d, images)
    result = diffnet(d, "predict", expt, "nproc=1", "batch_size=4")
    assert result.returncode == 0, result.stderr
    model = {(r["experiment_index"], r["image_index"]): r for r in load_records(d / "diffnet.json")}
    strong = find_spots(d, expt)
    experiments = ExperimentListFactory.from_json_file(str(expt), check_format=False)
    spots = flex.reflection_table.from_file(str(strong))
    spots.centroid_px_to_mm(experiments)
    spots.map_centroids_to_reciprocal_space(experiments)
    spot_d = {i: 1.0 / np.asarray(spots["rlp"].select(spots["id"] == i).norms()) for i in range(len(experiments))}
    pairs = [(model[(s["experiment"], s["index"])], s) for s in dials_baseline(expt, strong)]
    return pairs, spot_d


def test_shipped_model_calls_hits_where_dials_finds_many_spots_and_misses_where_it_finds_few(shipped_model_against_dials):
    pairs, _ = shipped_model_against_dials
    clear_hits = [(m, s) for m, s in pairs if s["n_spots"] >= CLEAR_HIT_SPOTS]
    clear_misses = [(m, s) for m, s in pairs if s["n_spots"] < CLEAR_MISS_SPOTS]
    assert clear_hits and clear_misses  # the real set has both kinds (l-cysteine 0.1 deg frames: 1-2 spots)
    for m, s in clear_hits:
        assert m["p_hit"] >= 0.5, (m["path"], s["n_spots"], m["p_hit"])
    for m, s in clear_misses:
        assert m["p_hit"] < 0.5, (m["path"], m["image_index"], s["n_spots"], m["p_hit"])


def test_shipped_model_resolution_sits_where_the_dials_strong_spots_run_out(shipped_model_against_dials):
    """On single-image experiments that DIALS calls clear hits, d_min lies within 35 % of the d
    beyond which only 2 % of the strong spots lie: a wrong pixel-to-|q| mapping (distance, pixel
    size, wavelength or beam centre misread) misses by more. The bound is the label's own spread
    against this reference: on 72 simulated clear hits (400 CBF stills of seed 202,
    `dials.find_spots`) the label d_min lies at 0.77-1.36 of it for 95 % (14 % beyond 25 %).
    Crystal 0.11.0 reads the Eiger2 16M frame 1.13x, 0.10.0 1.15x, 0.9.0 1.18x, 0.8.0 1.26x, 0.7.0 1.25x. DIALS's own `estimated_d_min`
    extrapolates past the last spots (1.53 A on the I03 frame whose spots stop near 2.0 A).
    Frames whose spots reach past the grid (the small-molecule Pilatus 300K at 2-theta 20 deg,
    spots to 0.95 A) are left out: the model cannot see them."""
    pairs, spot_d = shipped_model_against_dials
    judged = 0
    for m, s in pairs:
        d = spot_d[s["experiment"]]
        if s["n_spots"] < CLEAR_HIT_SPOTS or s["index"] != 0 or len(d) != s["n_spots"]:
            continue  # not a clear hit, or an experiment of several images
        spot_extent = float(np.quantile(d, 0.02))
        if spot_extent < 1.0 / CRYSTAL_GRID.s_max:
            continue
        judged += 1
        assert abs(m["d_min"] / spot_extent - 1) <= 0.35, (m["path"], m["d_min"], spot_extent)
    assert judged >= 3
