"""Helpers shared by the benchmark scripts: running DIALS/diffnet commands, timing, a model to time with."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")

BIN = pathlib.Path(sys.executable).parent  # the venv's console scripts (diffnet.*)

# The shipped crystal model's architecture; a random one of the same shape times the same.
BENCH_CARD = {
    "name": "crystal",
    "version": "bench-random",
    "architecture": {"class": "CrystalNet", "depth": 18, "width": 16, "in_channels": 2},
}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def run_command(argv, cwd, log_name=None) -> float:
    """Run a command line as a user would; wall seconds. Raises with its output tail if it fails."""
    start = time.perf_counter()
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if log_name:
        (pathlib.Path(cwd) / log_name).write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds


def diffnet_script(name: str) -> str:
    return str(BIN / f"diffnet.{name}")


def crystal_model(workdir) -> pathlib.Path:
    """The shipped crystal model if installed, else a random CrystalNet of the same architecture."""
    from dials_diffnet.weights import save_model, shipped_path

    shipped = shipped_path("crystal")
    if shipped.is_file():
        return shipped
    import torch

    from dials_diffnet.models import build

    path = pathlib.Path(workdir) / "model" / "crystal.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_model(build(BENCH_CARD["architecture"]), BENCH_CARD, path)
    return path


def warm_page_cache(paths) -> int:
    """Read every file once so all timed methods see the same (cached) files; bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                total += len(block)
    return total


def image_files(expt_path) -> list[str]:
    """Every distinct image file behind an .expt (without opening the images)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.images import iter_image_refs

    experiments = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    return sorted({ref.path for ref in iter_image_refs(experiments)})


def seconds_per_call(fn, repeats: int, device=None) -> float:
    """Median wall time of fn() over `repeats` calls after two warm-up calls (CUDA work waited for)."""
    import torch

    def wait():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(repeats + 2):
        wait()
        start = time.perf_counter()
        fn()
        wait()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path, document) -> None:
    pathlib.Path(path).write_text(json.dumps(document, indent=1) + "\n")
