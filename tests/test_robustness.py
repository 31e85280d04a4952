"""Faults a pipeline meets unattended (issue 7): NaN/inf pixels in real float CBF files, and a killed run.

Float images are written as full CBF by the simulator's writer and read back through
dials.import and dxtbx; the killed run is a real diffnet.predict process sent SIGKILL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest
from test_predict import (
    BIN,
    crystal_model,  # noqa: F401  (fixture)
    dials_import,
    diffnet,
    load_records,
    spotty_image,
    write_stills,
)

from dials_diffnet.simulate.cbf import dxtbx_beam, write_cbf
from dials_diffnet.simulate.detectors import DetectorModel, panel_geometries, to_dxtbx

SIZE = 192
# An integrating detector that writes float pixels: two 96 x 192 panels side by side, 0.2 mm pixels
# at 80 mm (reaching beyond 1.25 A at 1 A). Multi-panel float CBF is read by dxtbx's
# FormatCBFMultiTileHierarchy; Debian's dxtbx 3.11 cannot read single-panel float CBF (np.float).
FLOAT_DETECTOR = DetectorModel(
    name="float_ccd",
    pixel_size=0.2,
    panels=((SIZE // 2, SIZE, (-9.8, 0.0), 0.0), (SIZE // 2, SIZE, (9.8, 0.0), 0.0)),
    modules=None,
    counting=False,
    trusted_range=(-1.0, 65535.0),
    distance_range=(80.0, 80.0),
    dead_value=-2.0,
)
SINGLE_PANEL = dataclasses.replace(FLOAT_DETECTOR, name="float_single", panels=((SIZE, SIZE, (0.0, 0.0), 0.0),))


def float_image(seed):
    rng = np.random.default_rng(seed)
    data = rng.gamma(3.0, 2.0, size=(SIZE, SIZE))
    for y, x in rng.integers(8, SIZE - 8, size=(25, 2)):
        data[y - 1 : y + 2, x - 1 : x + 2] += 500.0
    return data


def as_panels(image, model):
    """The (SIZE, SIZE) image cut into the model's panels, left to right."""
    return np.split(image, len(model.panels), axis=1)


def sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# --- NaN and inf in float CBF -----------------------------------------------------------------

# name -> (image, expected failure prefix, or None for a finite prediction)
def float_cases():
    base = float_image(0)
    holes, masked = base.copy(), base.copy()
    for region in (np.s_[10:40, 10:40], np.s_[100, 50:150], np.s_[150, 20:90]):
        masked[region] = FLOAT_DETECTOR.dead_value  # below the trusted range: masked the usual way
    holes[10:40, 10:40] = np.nan  # the same pixels as NaN, +inf and -inf
    holes[100, 50:150] = np.inf
    holes[150, 20:90] = -np.inf
    one_panel_nan = base.copy()
    one_panel_nan[:, : SIZE // 2] = np.nan
    nan_and_zero = np.zeros((SIZE, SIZE))
    nan_and_zero[::2] = np.nan
    return {
        "clean": (base, None),
        "holes": (holes, None),
        "masked": (masked, None),
        "one_panel_nan": (one_panel_nan, None),
        "all_nan": (np.full((SIZE, SIZE), np.nan), "no finite pixel values"),
        "all_minus_inf": (np.full((SIZE, SIZE), -np.inf), "no finite pixel values"),
        "all_plus_inf": (np.full((SIZE, SIZE), np.inf), "no valid pixels"),
        "nan_and_zero": (nan_and_zero, "all pixels are zero"),
    }


@pytest.fixture(scope="module")
def float_stills(tmp_path_factory):
    d = tmp_path_factory.mktemp("float_cbf")
    beam = dxtbx_beam(1.0)
    cases = float_cases()
    files = {}
    for model, names in ((FLOAT_DETECTOR, list(cases)), (SINGLE_PANEL, ["single_panel"])):
        detector = to_dxtbx(model, panel_geometries(model, 80.0, (0.0, 0.0)))
        for name in names:
            files[name] = d / f"float_{len(files) + 1:05d}.cbf"
            image = cases[name][0] if name in cases else float_image(1)
            write_cbf(files[name], detector, beam, as_panels(image, model), integer=False)
    expt = dials_import(d, files.values(), "imported.expt", "convert_sequences_to_stills=True")
    return expt, files, {name: expected for name, (_, expected) in cases.items()}


def test_float_cbf_keeps_nan_and_inf_as_written(float_stills):
    """The premise: dxtbx hands the non-finite values to diffnet unchanged."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt, files, _ = float_stills
    experiments = ExperimentListFactory.from_json_file(str(expt), check_format=True)
    index = list(files).index("holes")
    pixels = np.hstack([p.as_numpy_array() for p in experiments[index].imageset.get_raw_data(0)])
    assert pixels.dtype == np.float64
    assert np.isnan(pixels[10:40, 10:40]).all()
    assert np.isposinf(pixels[100, 50:150]).all() and np.isneginf(pixels[150, 20:90]).all()


def test_nan_and_inf_pixels_are_masked_or_flagged_never_propagated(float_stills, crystal_model, tmp_path):  # noqa: F811
    expt, files, expected = float_stills
    before = {p: sha(p) for p in [expt, *files.values()]}
    result = diffnet(tmp_path, "predict", expt, f"model.crystal={crystal_model}", "nproc=1", "batch_size=4")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    records = dict(zip(files, load_records(tmp_path / "diffnet.json")))
    single = records.pop("single_panel")  # dxtbx may or may not read it: either verdict, never a crash
    assert single["ok"] or single["failure"].startswith("unreadable"), single["failure"]
    for name, record in records.items():
        if expected[name] is None:
            assert record["ok"], (name, record["failure"])
            assert all(math.isfinite(record[k]) for k in ("d_min", "s_min", "p_multi", "p_hit")), name
        else:
            assert not record["ok"] and record["failure"].startswith(expected[name]), (name, record["failure"])
            assert record["d_min"] is None
    # non-finite pixels count exactly as masked ones: same network input, so the same verdict
    for k in ("s_min", "p_multi", "p_hit"):
        assert records["holes"][k] == pytest.approx(records["masked"][k], rel=1e-5)
    assert records["holes"]["s_min"] != records["clean"]["s_min"], "the holes must change the input"
    assert {p: sha(p) for p in before} == before, "inputs must never be modified"


# --- a killed run -------------------------------------------------------------------------------

N_KILL_IMAGES = 240


@pytest.fixture(scope="module")
def many_stills(tmp_path_factory):
    """Enough small stills that a run lasts seconds: a few files, linked under many names."""
    d = tmp_path_factory.mktemp("many")
    originals = write_stills(d / "originals", [spotty_image(i) for i in range(4)])
    links = []
    for i in range(N_KILL_IMAGES):
        link = d / f"many_{i + 1:05d}.cbf"
        link.symlink_to(originals[i % len(originals)])
        links.append(link)
    expt = dials_import(d, links, "imported.expt", "convert_sequences_to_stills=True")
    return expt, originals


def children(pid) -> list[int]:
    try:
        text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def alive(pid) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killed_run_leaves_inputs_intact_and_no_partial_outputs(many_stills, crystal_model, tmp_path):  # noqa: F811
    expt, originals = many_stills
    before = {p: sha(p) for p in [expt, *originals]}
    args = [str(BIN / "diffnet.predict"), str(expt), f"model.crystal={crystal_model}", "nproc=1", "batch_size=1"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    console = tmp_path / "console.txt"
    with open(console, "w") as out:
        process = subprocess.Popen(args, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT)
    log = run_dir / "diffnet.predict.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and "Judging" in log.read_text() and children(process.pid):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # inside the image loop: the reader is up and images are being judged
    readers = children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{console.read_text()[-2000:]}"
    assert readers, "the run had no reader process when killed"

    # readers notice their parent is gone and exit
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in readers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in readers), "reader processes outlived the killed run"

    assert {p: sha(p) for p in before} == before, "a killed run must leave its inputs intact"
    left = sorted(p.name for p in run_dir.iterdir() if p.name != "diffnet.predict.log")
    assert left == [], f"a killed run left output files behind: {left}"
