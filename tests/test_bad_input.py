"""Messy input (issue 7): per-image problems are flagged and the run goes on; user errors are a one-line Sorry."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
import torch
from dials.util import Sorry
from dxtbx.model import ExperimentList
from dxtbx.model.experiment_list import ExperimentListFactory
from test_predict import (
    TRUSTED_MAX,
    crystal_model,  # noqa: F401  (fixture)
    diffnet,
    dials_import,
    find_spots,
    load_records,
    small_detector_and_beam,
    spotty_image,
    write_stills,
)

from diffnet.evaluate import run as evaluate_run
from diffnet.filter import run as filter_run
from diffnet.predict import run as predict_run
from diffnet.simulate import run as simulate_run
from diffnet.train import run as train_run
from dials_diffnet.images import cbflib_quiet, iter_image_refs, read_image
from dials_diffnet.inference import _image_sources, image_failure
from dials_diffnet.weights import shipped_path

# image name -> expected failure reason (prefix); None: judged normally
EXPECTED = {
    "good": None,
    "missing": "unreadable: the file is missing",
    "zero_bytes": "unreadable: the file is empty",
    "truncated": "unreadable",
    "random_bytes": "unreadable: the file is not an image dxtbx can read",
    "all_zero": "all pixels are zero",
    "saturated": "saturated",
    "all_masked": "no valid pixels",
}


def sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """Stills imported one ImageSet each, then some files broken behind the .expt's back."""
    d = tmp_path_factory.mktemp("messy")
    contents = {
        "all_zero": np.zeros((256, 256), np.int32),
        "saturated": np.full((256, 256), TRUSTED_MAX, np.int32),
        "all_masked": np.full((256, 256), -1, np.int32),
    }
    images = [contents.get(name, spotty_image(i)) for i, name in enumerate(EXPECTED)]
    files = dict(zip(EXPECTED, write_stills(d, images)))
    expt = dials_import(d, files.values(), "imported.expt", "convert_sequences_to_stills=True")
    files["missing"].unlink()
    files["zero_bytes"].write_bytes(b"")
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:3000])
    files["random_bytes"].write_bytes(np.random.default_rng(1).bytes(5000))
    return expt, files


def test_per_image_failures_flagged_run_goes_on_and_filter_drops_them(messy, crystal_model, tmp_path):  # noqa: F811
    expt, files = messy
    before = {p: sha(p) for p in [expt, *files.values()] if p.exists()}
    result = diffnet(tmp_path, "predict", expt, f"model.crystal={crystal_model}", "nproc=1", "batch_size=3")
    assert result.returncode == 0, result.stderr
    records = load_records(tmp_path / "diffnet.json")
    assert [pathlib.Path(r["path"]).name for r in records] == [f.name for f in files.values()]
    for name, record in zip(EXPECTED, records):
        expected = EXPECTED[name]
        if expected is None:
            assert record["ok"] and np.isfinite(record["d_min"])
        else:
            assert not record["ok"] and record["failure"].startswith(expected), (name, record["failure"])
            assert record["d_min"] is None and record["p_hit"] is None
    assert "failed" in result.stdout

    result = diffnet(tmp_path, "filter", expt, tmp_path / "diffnet.json", "min_p_hit=0", "max_p_multi=1")
    assert result.returncode == 0, result.stderr
    kept = ExperimentListFactory.from_json_file(str(tmp_path / "filtered.expt"), check_format=True)
    assert [pathlib.Path(r.path).name for r in iter_image_refs(kept)] == [files["good"].name]
    assert "failed: unreadable" in result.stdout
    assert {p: sha(p) for p in before} == before, "inputs must never be modified"


def test_nan_everywhere_is_a_failure_not_a_prediction(messy):
    _, files = messy
    experiments = ExperimentListFactory.from_filenames([str(files["good"])])
    raw = read_image(experiments[0].imageset, 0)
    assert image_failure(raw, [TRUSTED_MAX], 0.5) is None
    raw.pixels = [np.full(p.shape, np.nan, np.float32) for p in raw.pixels]  # as a float format would give
    raw.valid = [np.zeros_like(v) for v in raw.valid]
    assert image_failure(raw, [TRUSTED_MAX], 0.5).startswith("no finite pixel values")


def test_an_image_whose_only_nonzero_pixels_are_masked_is_all_zero(messy):
    """A noise-free SPI blank as mini-CBF: zeros, and -1 in the gaps dxtbx masks; it is no image to judge."""
    _, files = messy
    raw = read_image(ExperimentListFactory.from_filenames([str(files["good"])])[0].imageset, 0)
    for pixels, valid in zip(raw.pixels, raw.valid):
        pixels[...] = np.where(valid, 0, -1)
        valid[:10] = False  # a masked band, as the pnCCD's gap
        pixels[:10] = -1
    assert image_failure(raw, [TRUSTED_MAX], 0.5) == "all pixels are zero"
    raw.pixels[0][20, 20] = 1  # one counted photon: an image, if a poor one
    assert image_failure(raw, [TRUSTED_MAX], 0.5) is None


def test_a_shared_image_set_whose_first_file_is_empty_names_that_file(tmp_path):
    files = write_stills(tmp_path, [spotty_image(i) for i in range(3)])
    expt = dials_import(tmp_path, files)  # one ImageSequence of stills: dxtbx opens it by its first file
    files[0].write_bytes(b"")
    assert _image_sources(expt) == ["unreadable: the file is empty"] + 2 * [
        f"unreadable: {files[0]}, the first file of its image set, is empty"]


def test_truncated_full_cbf_is_flagged_without_cbflib_noise(tmp_path, crystal_model):  # noqa: F811
    from dials_diffnet.simulate.cbf import write_cbf as write_full_cbf  # cbflib reads these, unlike miniCBF

    detector, beam = small_detector_and_beam()
    files = [tmp_path / f"full_{i + 1:05d}.cbf" for i in range(2)]
    for i, path in enumerate(files):
        write_full_cbf(str(path), detector, beam, [spotty_image(i)], compress=True)
    expt = dials_import(tmp_path, files, "imported.expt", "convert_sequences_to_stills=True")
    files[1].write_bytes(files[1].read_bytes()[:-100])
    result = diffnet(tmp_path, "predict", expt, f"model.crystal={crystal_model}", "nproc=0")
    assert result.returncode == 0, result.stderr
    good, truncated = load_records(tmp_path / "diffnet.json")
    assert good["ok"] and not truncated["ok"] and truncated["failure"].startswith("unreadable"), truncated
    assert "CBFlib" not in result.stderr + result.stdout


def test_cbflib_quiet_drops_only_cbflib_lines(capfd):
    with cbflib_quiet():
        os.write(2, b"CBFlib: error input line 150 (1) -- syntax error\nsomething else\n")
    assert capfd.readouterr().err == "something else\n"


# --- user errors: one-line Sorry, raised before any output is written -------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_sorry(run, args, words):
    with pytest.raises(Sorry) as e:
        run([str(a) for a in args])
    message = str(e.value)
    assert "\n" not in message
    assert words in message, message


@pytest.fixture(scope="module")
def other_stills(tmp_path_factory):
    d = tmp_path_factory.mktemp("other")
    expt = dials_import(d, write_stills(d, [spotty_image(20 + i) for i in range(2)], prefix="other"))
    return expt, find_spots(d, expt)


def test_empty_experiment_list(in_tmp, crystal_model):  # noqa: F811
    ExperimentList().as_file(str(in_tmp / "empty.expt"))
    assert_sorry(predict_run, ["empty.expt", f"model.crystal={crystal_model}"], "no experiments")


def test_reflections_of_other_experiments(in_tmp, messy, other_stills, crystal_model):  # noqa: F811
    expt, _ = messy
    _, other_refl = other_stills
    assert_sorry(predict_run, [expt, other_refl, f"model.crystal={crystal_model}"], "does not belong")


def test_records_of_other_images(in_tmp, messy, other_stills, crystal_model):  # noqa: F811
    expt, _ = other_stills
    messy_expt, _ = messy
    result = diffnet(in_tmp, "predict", messy_expt, f"model.crystal={crystal_model}", "nproc=0", "output.json=messy.json")
    assert result.returncode == 0, result.stderr
    assert_sorry(filter_run, [expt, "messy.json"], "does not describe these experiments")
    (in_tmp / "not_records.json").write_text(json.dumps({"records": []}))
    assert_sorry(filter_run, [expt, "not_records.json"], "not a diffnet records file")


def test_output_paths(in_tmp, other_stills, crystal_model):  # noqa: F811
    expt, refl = other_stills
    model = f"model.crystal={crystal_model}"
    assert_sorry(predict_run, [expt, model, f"output.json={expt}"], "is also an input")
    assert_sorry(predict_run, [expt, refl, model, f"output.reflections={refl}"], "is also an input")
    assert_sorry(predict_run, [expt, model, "output.json=/proc/diffnet-test/x.json"], "cannot write")
    assert_sorry(filter_run, [expt, model, f"output.experiments={expt}"], "is also an input")
    assert not (in_tmp / "diffnet.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(in_tmp, other_stills, crystal_model):  # noqa: F811
    expt, _ = other_stills
    assert_sorry(predict_run, [expt, f"model.crystal={crystal_model}", "device=cuda"], "no CUDA GPU")
    assert_sorry(predict_run, [expt, f"model.crystal={crystal_model}", "device=tpu"], "not understood")


def test_tampered_and_missing_weights(in_tmp, other_stills, crystal_model):  # noqa: F811
    expt, _ = other_stills
    tampered = in_tmp / "crystal.safetensors"
    data = bytearray(crystal_model.read_bytes())
    data[-10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    (in_tmp / "crystal.json").write_bytes(crystal_model.with_suffix(".json").read_bytes())
    assert_sorry(predict_run, [expt, f"model.crystal={tampered}"], "checksum")
    assert_sorry(predict_run, [expt, f"model.crystal={in_tmp / 'absent.safetensors'}"], "missing")
    if not shipped_path("crystal").is_file():
        assert_sorry(predict_run, [expt], "not installed")


def test_simulate_refuses_to_resume_shards_of_other_planes(in_tmp):
    common = ["format=shards", "n_images=1", "shard_size=1", "output.directory=sets", "output.log=None"]
    simulate_run([*common, "planes=2"])
    before = (in_tmp / "sets" / "shard_00000.npz").read_bytes()
    assert_sorry(simulate_run, [*common, "planes=3"], "holds shards of another number of planes")
    assert (in_tmp / "sets" / "shard_00000.npz").read_bytes() == before
    assert json.loads((in_tmp / "sets" / "index.json").read_text())["planes"] == 2


def test_spi_missing_reference_set(in_tmp, other_stills):
    expt, _ = other_stills
    assert_sorry(predict_run, [expt, "task=spi", "spi.reference=no_such_support.cxi"], "does not exist")


@pytest.mark.parametrize(
    "args, words",
    [
        (["format=minicbf", "recipe.detectors=cspad"], "Pilatus detectors only"),
        (["format=minicbf", "recipe.detectors=pilatus6m", "compress=False"], "always byte-offset"),
        (["format=nexus", "recipe.detectors=cspad"], "single-panel detectors only"),
        (["format=nexus", "recipe.detectors=eiger4m", "compress=False"], "always bitshuffle-LZ4"),
        (["recipe.detectors=nosuchdetector"], "Unknown detector"),
    ],
)
def test_simulate_refuses_what_it_cannot_write(in_tmp, args, words):
    assert_sorry(simulate_run, ["n_images=1", "output.directory=out", "output.log=None", *args], words)
    assert not (in_tmp / "out").exists() or not any((in_tmp / "out").glob("shot*"))


@pytest.mark.parametrize(
    "run, args, words",
    [
        (simulate_run, ["n_images=0"], "n_images element is less than the minimum allowed value: 0 < 1"),
        (simulate_run, ["n_images=x"], "n_images=x is not a number: n_images takes int(value_min=1)"),
        (simulate_run, ["n_images=None"], "n_images=None is not allowed: n_images takes int(value_min=1)"),
        (simulate_run, ["recipe.p_blank=2"], "recipe.p_blank element is greater than the maximum allowed value: 2 > 1"),
        (simulate_run, ["recipe.wavelength=1.0"], "recipe.wavelength: 1 given, exactly 2 required"),
        (simulate_run, ["recipe.unit_cell=1,2"], "recipe.unit_cell: 2 given, exactly 6 required"),
        (simulate_run, ["format=None"], "Not a possible choice for format: None"),
        (evaluate_run, ["views=x", "."], "views=x is not a number: views takes int"),
        (evaluate_run, ["batch_size=0", "."], "batch_size element is less than the minimum allowed value: 0 < 1"),
        (train_run, ["epochs=-1"], "epochs element is less than the minimum allowed value: -1 < 1"),
        (train_run, ["epochs=x"], "epochs=x is not a number: epochs takes int(value_min=1)"),
    ],
)
def test_simulate_evaluate_and_train_refuse_a_bad_value_as_predict_does(in_tmp, run, args, words):
    assert_sorry(run, args, words)
    assert not any(in_tmp.iterdir())


@pytest.mark.parametrize(
    "run, args, words",
    [
        (predict_run, ["task=None"], "Not a possible choice for task: None"),
        (filter_run, ["task=None"], "Not a possible choice for task: None"),
        (predict_run, ["summary.hit_threshold=None"],
         "summary.hit_threshold=None is not allowed: summary.hit_threshold takes float(value_min=0, value_max=1)"),
        (predict_run, ["summary.multi_threshold=None"], "summary.multi_threshold=None is not allowed"),
        (filter_run, ["batch_size=None"], "batch_size=None is not allowed"),
    ],
)
def test_none_where_a_value_is_needed_is_refused_before_any_output(in_tmp, other_stills, crystal_model,  # noqa: F811
                                                                    run, args, words):
    expt, _ = other_stills
    assert_sorry(run, [expt, f"model.crystal={crystal_model}", *args], words)
    assert not any(in_tmp.iterdir())
