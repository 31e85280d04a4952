"""diffnet.evaluate: metric functions on hand-made predictions, the command, and the DIALS baseline."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dials_diffnet import evaluate
from dials_diffnet.datasets import LABELS, ShardDataset, write_index, write_shard
from dials_diffnet.models.resnet import CrystalNet
from dials_diffnet.models.views import ViewAveraged
from dials_diffnet.weights import save_model


def brute_force_auc(scores, truth):
    pairs = [(p, n) for p, n in itertools.product(scores[truth], scores[~truth])]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])


def test_roc_auc():
    truth = np.array([0, 0, 1, 1, 0, 1], bool)
    perfect = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert evaluate.roc_auc(perfect, truth) == 1.0
    assert evaluate.roc_auc(-perfect, truth) == 0.0
    assert evaluate.roc_auc(np.full(6, 0.5), truth) == 0.5  # all tied
    rng = np.random.default_rng(0)
    big_truth = rng.random(20000) < 0.3
    assert evaluate.roc_auc(rng.random(20000), big_truth) == pytest.approx(0.5, abs=0.02)
    # Ties count one half, as the pairwise definition says.
    scores = rng.integers(0, 5, 200).astype(float)
    small_truth = rng.random(200) < 0.4
    assert evaluate.roc_auc(scores, small_truth) == pytest.approx(brute_force_auc(scores, small_truth))
    assert np.isnan(evaluate.roc_auc([0.1, 0.2], [True, True]))


def test_pearson_and_resolution_metrics():
    rng = np.random.default_rng(1)
    a, b = rng.random(50), rng.random(50)
    assert evaluate.pearson_r(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert evaluate.pearson_r(a, 2 * a + 1) == pytest.approx(1.0)
    assert np.isnan(evaluate.pearson_r([1.0, 1.0], [1.0, 2.0]))
    # d true (2, 4), predicted (2, 5): errors 0 and 1 A; relative 0 and 25%.
    m = evaluate.resolution_metrics([0.5, 0.2], [0.5, 0.25])
    assert m["n"] == 2
    assert m["mae_d"] == pytest.approx(0.5)
    assert m["mae_inv_d"] == pytest.approx(0.025)
    assert m["median_rel_err_d"] == pytest.approx(0.125)
    assert m["fraction_within_10pct"] == 0.5
    assert m["pearson_r_inv_d"] == pytest.approx(1.0) and m["pearson_r_d"] == pytest.approx(1.0)
    # Edge-limited labels: d 2 A "or better"; predictions 1.8 A, 2.1 A (within 10%) and 3 A.
    e = evaluate.edge_limited_metrics(1 / np.array([1.8, 2.1, 3.0]), np.full(3, 0.5))
    assert e["fraction_at_least_as_good"] == pytest.approx(2 / 3)
    assert e["median_shortfall_rel_d"] == pytest.approx(0.05)


def test_binary_metrics_and_bins():
    m = evaluate.binary_metrics([0.9, 0.8, 0.2, 0.6, 0.1], [True, False, True, False, False])
    assert m["confusion"] == {"tp": 1, "fp": 2, "fn": 1, "tn": 1}
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 / 3) / 2)
    bins = evaluate.binned_accuracy([True, False, True, True], [0.2, 0.7, 3.0, 180.0], (0, 1, 10, 180))
    assert [(b["n"], b["accuracy"]) for b in bins] == [(2, 0.5), (1, 1.0), (1, 1.0)]


def labels_for(n, rng):
    is_hit = np.arange(n) % 4 != 0
    is_multi = is_hit & (np.arange(n) % 2 == 0)
    s_min = np.where(is_hit, rng.uniform(0.25, 0.7, n), 0.0)
    return {
        "s_min": s_min, "d_min": np.where(is_hit, 1 / np.maximum(s_min, 1e-6), np.inf),
        "edge_limited": is_hit & (np.arange(n) % 7 == 1), "is_hit": is_hit, "is_multi": is_multi,
        # every 8th shot: a crystal with too few spots for a hit (a near miss), not an empty shot
        "n_lattices": is_hit.astype(int) + is_multi + (np.arange(n) % 8 == 0), "minority_share": np.where(is_multi, 0.3, 0.0),
        "misorientation_deg": np.where(is_multi, rng.uniform(0, 90, n), np.nan),
        "detector": np.where(np.arange(n) % 3 == 0, "pilatus6m", "eiger16m"), "seed": np.arange(n),
        # hits 10 spots and up, near misses 3, empty shots none
        "n_detectable": np.where(is_hit, 10 + np.arange(n), np.where(np.arange(n) % 8 == 0, 3, 0)),
    }


def test_crystal_metrics_use_the_right_images():
    rng = np.random.default_rng(2)
    labels = labels_for(56, rng)
    hit, edge = labels["is_hit"], labels["edge_limited"]
    # Perfect on non-edge hits; nonsense on blanks and edge-limited labels, which must not count.
    s_pred = np.where(hit & ~edge, labels["s_min"], 5.0)
    predictions = {"s_min": s_pred, "p_multi": np.where(labels["is_multi"], 0.9, 0.1), "p_hit": np.where(hit, 0.8, 0.3)}
    m = evaluate.crystal_metrics(predictions, labels)
    assert m["resolution"]["n"] == (hit & ~edge).sum()
    assert m["resolution"]["median_rel_err_d"] == 0 and m["resolution"]["pearson_r_inv_d"] == pytest.approx(1.0)
    assert m["resolution_edge_limited"]["n"] == (hit & edge).sum()
    assert m["resolution_edge_limited"]["fraction_at_least_as_good"] == 1.0  # 0.2 A is better than any label
    assert m["multi_lattice"]["n"] == hit.sum() and m["multi_lattice"]["accuracy"] == 1.0
    assert m["hit"]["n"] == 56 and m["hit"]["roc_auc"] == 1.0
    assert m["hit_near_misses"] == {"n": 7, "fraction_called_hit": 0.0}
    assert m["hit_vs_empty"]["n"] == 56 - 7 and m["hit_vs_empty"]["n_positive"] == hit.sum()
    assert sum(b["n"] for b in m["multi_lattice"]["accuracy_by_misorientation_deg"]) == labels["is_multi"].sum()
    assert set(m["by_detector"]) == {"pilatus6m", "eiger16m"}
    # crystals called hits by detectable spots: none of the 7 near misses (3 spots), all 42 hits
    by_spots = {(b["lo"], b["n"], b["fraction_called_hit"]) for b in m["hit_called_by_detectable_spots"] if b["n"]}
    assert by_spots == {(0, 7, 0.0), (10, 3, 1.0), (15, 4, 1.0), (20, 8, 1.0), (30, 15, 1.0), (50, 12, 1.0)}


def test_resolution_error_is_reported_by_detectable_spots():
    rng = np.random.default_rng(3)
    labels = labels_for(400, rng)
    hit, edge, n_spots = labels["is_hit"], labels["edge_limited"], labels["n_detectable"]
    # d 25 % too large on hits with fewer than 50 detectable spots, exact from 50 up; edge-limited
    # hits (any prediction) must not count in any bin
    s_pred = np.where(n_spots < 50, labels["s_min"] / 1.25, labels["s_min"])
    s_pred = np.where(edge, 5.0, s_pred)
    predictions = {"s_min": s_pred, "p_multi": np.full(400, 0.5), "p_hit": np.where(hit, 0.8, 0.3)}
    m = evaluate.crystal_metrics(predictions, labels)
    bins = {(b["lo"], b["hi"]): b for b in m["resolution_by_detectable_spots"]}
    assert list(bins) == list(zip(evaluate.RESOLUTION_SPOT_BINS[:-1], evaluate.RESOLUTION_SPOT_BINS[1:]))
    counted = hit & ~edge
    for (lo, hi), b in bins.items():
        assert b["n"] == (counted & (n_spots >= lo) & (n_spots < hi)).sum()
    assert bins[(10, 20)]["median_rel_err_d"] == pytest.approx(0.25) and bins[(20, 50)]["fraction_within_10pct"] == 0.0
    assert bins[(50, 100)]["median_rel_err_d"] == 0 and bins[(100, 300)]["fraction_within_10pct"] == 1.0
    assert sum(b["n"] for b in bins.values()) == m["resolution"]["n"]  # every counted hit has >= 10 spots
    assert "Resolution of hits (not edge-limited) by detectable spots" in evaluate.format_tables(m)


def test_hit_operating_points_count_what_each_filter_bar_keeps():
    # 4 hits, 3 shots without a crystal, 2 crystals with too few spots
    is_hit = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    has_crystal = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1], bool)
    p_hit = np.array([0.9, 0.6, 0.25, 0.15, 0.12, 0.05, 0.0, 0.4, 0.05])
    rows = {r["min_p_hit"]: r for r in evaluate.hit_operating_points(p_hit, is_hit, has_crystal)}
    assert list(rows) == list(evaluate.HIT_OPERATING_POINTS)
    assert rows[0.5] == {"min_p_hit": 0.5, "hits_kept": 0.5, "empty_kept": 0.0, "near_misses_kept": 0.0,
                         "hit_vs_empty_accuracy": 5 / 7, "hit_accuracy": 7 / 9}
    assert rows[0.2]["hits_kept"] == 0.75 and rows[0.2]["near_misses_kept"] == 0.5
    # the lowest bar keeps every hit, one empty shot and the bright near miss
    assert rows[0.1] == {"min_p_hit": 0.1, "hits_kept": 1.0, "empty_kept": 1 / 3, "near_misses_kept": 0.5,
                         "hit_vs_empty_accuracy": 6 / 7, "hit_accuracy": 7 / 9}


def test_spot_count_controls_tell_counting_spots_from_seeing_lattices():
    rng = np.random.default_rng(5)
    n_detectable = rng.integers(10, 1000, 4000)
    # multi-lattice shots have more spots: the count alone ranks them above chance
    is_multi = rng.random(4000) < np.clip(np.log10(n_detectable) / 3, 0, 1)
    counting = evaluate.spot_count_controls(np.log(n_detectable) + 0.01 * rng.random(4000), is_multi, n_detectable)
    assert counting["spot_count_auc"] > 0.75
    # knows nothing beyond the count: near chance once hits of similar count are compared
    assert counting["auc_at_fixed_spot_count"] < 0.6
    seeing = evaluate.spot_count_controls(is_multi + 0.3 * rng.random(4000), is_multi, n_detectable)
    assert seeing["auc_at_fixed_spot_count"] == pytest.approx(1.0)
    assert seeing["spot_count_auc"] == counting["spot_count_auc"]  # a property of the labels, not the model
    # and crystal_metrics reports them where the shards store the count
    labels = labels_for(56, np.random.default_rng(2))
    hit = labels["is_hit"]
    m = evaluate.crystal_metrics({"s_min": labels["s_min"], "p_multi": labels["is_multi"] * 1.0, "p_hit": hit * 1.0}, labels)
    assert m["multi_lattice"]["spot_count_auc"] == evaluate.roc_auc(labels["n_detectable"][hit], labels["is_multi"][hit])


def test_tables_print_the_same_from_metrics_and_from_a_model_card():
    # diffnet.train prints the card's validation metrics, where json_safe has made inf bin edges None
    labels = labels_for(56, np.random.default_rng(2))
    hit = labels["is_hit"]
    m = evaluate.crystal_metrics({"s_min": labels["s_min"], "p_multi": labels["is_multi"] * 0.8, "p_hit": hit * 0.9}, labels)
    text = evaluate.format_tables(m)
    assert text == evaluate.format_tables(json.loads(json.dumps(evaluate.json_safe(m))))
    assert "100+" in text and "30-50" in text and "spot-count control" in text and "min_p_hit" in text


def test_shards_written_before_the_spot_count_was_stored_still_load(tmp_path):
    rng = np.random.default_rng(4)
    labels = labels_for(8, rng)
    np.savez(tmp_path / "shard_00000.npz", x=np.zeros((8, 2, 64, 64), np.float16),
             **{k: np.asarray(v) for k, v in labels.items() if k != "n_detectable"})
    write_index(tmp_path, ["shard_00000.npz"], 8, grid=(64, 0.8))
    loaded = ShardDataset(tmp_path).labels
    assert (loaded["n_detectable"] == -1).all() and (loaded["is_hit"] == labels["is_hit"]).all()
    predictions = {"s_min": labels["s_min"] + 0.01, "p_multi": np.full(8, 0.5), "p_hit": np.full(8, 0.7)}
    m = evaluate.crystal_metrics(predictions, loaded)
    assert "hit_called_by_detectable_spots" not in m and m["hit"]["n"] == 8


def test_compare_with_dials():
    d_true = np.array([2.0, 3.0, 4.0, 2.5, np.inf])
    is_hit = np.array([True, True, True, True, False])
    model_d = np.array([2.0, 3.0, 4.4, 2.5, 9.0])
    dials = [{"estimated_d_min": d, "n_spots": n} for d, n in ((2.4, 50), (np.nan, 8), (4.0, 30), (3.0, 40), (np.nan, 2))]
    c = evaluate.compare_with_dials(d_true, is_hit, model_d, [0.9, 0.9, 0.9, 0.9, 0.1], dials)
    assert c["resolution"]["model"]["n"] == 4 and c["resolution"]["dials"]["n"] == 3
    assert c["resolution"]["dials"]["fraction_estimated"] == 0.75
    assert c["resolution"]["model_on_common"]["median_rel_err_d"] == 0.0
    assert c["resolution"]["dials_on_common"]["median_rel_err_d"] == pytest.approx(0.2)
    assert c["hit"]["model"]["accuracy"] == 1.0
    assert c["hit"]["dials"]["confusion"] == {"tp": 3, "fp": 0, "fn": 1, "tn": 1}


def test_evaluate_command_writes_json_matching_the_library(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    labels = labels_for(24, rng)
    write_shard(tmp_path / "shard_00000.npz", rng.normal(size=(24, 2, 64, 64)), labels)
    write_index(tmp_path, ["shard_00000.npz"], 24, grid=(64, 0.8))
    torch.manual_seed(0)
    model = CrystalNet(18, 4)
    model.eval()
    save_model(model, {"architecture": {"class": "CrystalNet", "depth": 18, "width": 4, "in_channels": 2}, "grid": [64, 0.8]},
               tmp_path / "m.safetensors")
    from diffnet.evaluate import run

    monkeypatch.chdir(tmp_path)
    # views=Auto is diffnet.predict's default for the crystal model (2 views); views=1 is the network alone
    for views, args in ((2, []), (1, ["views=1", "output.json=one_view.json"])):
        run([str(tmp_path), f"model.crystal={tmp_path / 'm.safetensors'}", "batch_size=10", *args])
        written = json.loads((tmp_path / ("one_view.json" if args else "diffnet.evaluate.json")).read_text())
        expected, _ = evaluate.evaluate_crystal(ViewAveraged(model, views), ShardDataset(tmp_path), torch.device("cpu"))
        assert written["n_images"] == 24 and written["model"]["architecture"]["width"] == 4
        assert written["model"]["views"] == views
        assert written["hit"]["roc_auc"] == pytest.approx(expected["hit"]["roc_auc"])
        assert written["resolution"]["mae_d"] == pytest.approx(expected["resolution"]["mae_d"])
        assert written["multi_lattice"]["confusion"] == expected["multi_lattice"]["confusion"]
    assert not list(tmp_path.glob("diffnet.evaluate.json.*"))  # no temporary left behind
    assert set(LABELS) <= set(ShardDataset(tmp_path).labels)


def test_evaluate_command_refuses_missing_model(tmp_path):
    write_shard(tmp_path / "shard_00000.npz", np.zeros((2, 2, 64, 64)), labels_for(2, np.random.default_rng(0)))
    write_index(tmp_path, ["shard_00000.npz"], 2, grid=(64, 0.8))
    done = subprocess.run([sys.executable, "-m", "diffnet.evaluate", str(tmp_path), "model.crystal=absent.safetensors"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "missing" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_dials_baseline_on_a_real_image(realdata_dir, tmp_path):
    subprocess.run(["dials.import", str(realdata_dir / "ximg2701_00001.cbf")], cwd=tmp_path, check=True, capture_output=True)
    records = evaluate.dials_baseline(tmp_path / "imported.expt", find_spots_args=["spotfinder.mp.nproc=1"])
    assert len(records) == 1
    record = records[0]
    assert record["path"].endswith("ximg2701_00001.cbf") and record["index"] == 0
    assert record["n_spots"] >= evaluate.DIALS_MIN_SPOTS_FOR_HIT
    assert np.isfinite(record["estimated_d_min"]) and 0.5 < record["estimated_d_min"] < 5
    # Given the reflections, it reuses them instead of finding spots again.
    subprocess.run(["dials.find_spots", "imported.expt", "spotfinder.mp.nproc=1"], cwd=tmp_path, check=True, capture_output=True)
    again = evaluate.dials_baseline(tmp_path / "imported.expt", tmp_path / "strong.refl")
    assert again[0]["n_spots"] == record["n_spots"]
