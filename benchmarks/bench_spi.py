"""diffnet.predict task=spi on a CXI run: images per second, as users run it and in-process.

Simulated noisy pnCCD shots (seen particle types, 1-4 particles, test geometries,
seeds of the "check" range) are written as one CXI file; a labelled support set
of a held-back type (ferritin, 5 patterns per count) as another. Timed:
  - `diffnet.predict task=spi run.cxi` as a subprocess (start-up included), median of 3;
  - with the models averaged over the grid's default views (`views=Auto`: 4) and
    over one (`views=1`), each with and without `spi.reference=support.cxi` (few-shot labels
    from the twin network);
  - in-process `inference.predict_cxi` with the models loaded (start-up excluded).
SPI pipelines have no DIALS equivalent to compare against; the bare read of the CXI
frames (h5py) is timed as the limit.

    python benchmarks/bench_spi.py --workdir /tmp/bench_spi --n-shots 256
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

from common import diffnet_script, load_average, run_command, write_json


def write_run(workdir: pathlib.Path, n_shots: int) -> tuple[pathlib.Path, pathlib.Path]:
    from dials_diffnet.spi import simulate as sim
    from dials_diffnet.spi.cxi import write_cxi
    from dials_diffnet.spi.dataset import SEED_BASES
    from dials_diffnet.spi.particles import SEEN_TYPES

    run, support = workdir / "run.cxi", workdir / "support.cxi"
    seed = SEED_BASES["check"] + 50_000
    if not run.is_file():
        shots = [sim.simulate(sim.shot_params(seed + i, SEEN_TYPES[i % len(SEEN_TYPES)], 1 + i % 4, "noisy", "test"))
                 for i in range(n_shots)]
        write_cxi(run, shots)
    if not support.is_file():
        shots = [sim.simulate(sim.shot_params(seed + n_shots + i, "ferritin", 1 + i % 4, "noisy", "test"))
                 for i in range(20)]
        write_cxi(support, shots)
    return run, support


def time_read(run: pathlib.Path) -> float:
    from dials_diffnet.spi.cxi import read_cxi

    start = time.perf_counter()
    n = sum(1 for _ in read_cxi(run))
    return n / (time.perf_counter() - start)


def time_subprocess(run, workdir, *args, repeats=3) -> list[float]:
    return [run_command([diffnet_script("predict"), "task=spi", run, *args, f"output.json=bench_{k}.json",
                         f"output.table=bench_{k}.txt", f"output.log=bench_{k}.log"], cwd=workdir)
            for k in range(repeats)]


def time_in_process(run, views: int, reference=None) -> float:
    from dials_diffnet.inference import predict_cxi
    from dials_diffnet.spi.task import SpiTask

    task = SpiTask(reference=reference, views=views)
    start = time.perf_counter()
    records = predict_cxi(task, run, batch_size=16)
    return len(records) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_spi")
    parser.add_argument("--n-shots", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run, support = write_run(workdir, args.n_shots)
    import torch

    result = {"machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "platform": platform.platform(),
                          "torch": torch.__version__, "cuda": torch.cuda.is_available()},
              "n_shots": args.n_shots, "load_at_start": load_average(), "images_per_s": {}}
    rates = result["images_per_s"]
    rates["bare CXI read (h5py, one process)"] = time_read(run)
    from dials_diffnet.inference import DEFAULT_VIEWS

    n = DEFAULT_VIEWS["spi"]
    for name, extra in ((f"diffnet.predict task=spi ({n} views, default)", ()),
                        (f"  + spi.reference ({n} views)", (f"spi.reference={support}",)),
                        ("diffnet.predict task=spi views=1", ("views=1",)),
                        ("  + spi.reference views=1", (f"spi.reference={support}", "views=1"))):
        seconds = time_subprocess(run, workdir, *extra)
        rates[f"{name}, subprocess (median of 3)"] = args.n_shots / statistics.median(seconds)
    for views in (n, 1):
        rates[f"in-process, count + type, {views} view(s)"] = time_in_process(run, views)
        rates[f"in-process, + few-shot, {views} view(s)"] = time_in_process(run, views, support)
    result["load_at_end"] = load_average()
    print(f"{args.n_shots} noisy pnCCD shots, {result['machine']}, load {result['load_at_start']} -> {result['load_at_end']}")
    for k, v in rates.items():
        print(f"  {k:60s} {v:8.1f} images/s")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
