"""Memory over a long diffnet.predict run: RSS must stay flat as images go by.

Thousands of 6M-pixel images take too long to simulate, so the run uses a few
real miniCBF stills (1024 x 1024 pixels, written with dxtbx) linked under
thousands of distinct names and dials.import'ed as usual: a real experiment
list whose every image is opened, read, represented and judged.

diffnet.predict runs as a subprocess, as users run it, over the first 200 and
then all N images; a sampler reads /proc every 0.2 s for the main process and
its reader processes (RSS, and PSS, which splits the pages they share).

    python benchmarks/bench_memory.py --workdir /tmp/bench_memory --n-images 2000
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import threading
import time

import numpy as np
from common import crystal_model, diffnet_script, load_average, run_command, write_json

IMAGE_SIZE = 1024
N_DISTINCT = 8


def write_minicbf_stills(directory: pathlib.Path, n_distinct: int) -> list[pathlib.Path]:
    from dials.array_family import flex
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory

    detector = DetectorFactory.simple(
        "PAD", 100.0, (IMAGE_SIZE * 0.172 / 2, IMAGE_SIZE * 0.172 / 2), "+x", "-y",
        (0.172, 0.172), (IMAGE_SIZE, IMAGE_SIZE), trusted_range=(-1, 1e6),
    )
    beam = BeamFactory.simple(1.0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_distinct):
        rng = np.random.default_rng(i)
        data = rng.poisson(5, size=(IMAGE_SIZE, IMAGE_SIZE)).astype(np.int32)
        for y, x in rng.integers(10, IMAGE_SIZE - 10, size=(200, 2)):
            data[y - 1 : y + 2, x - 1 : x + 2] += 300
        path = directory / f"distinct_{i + 1:05d}.cbf"
        FormatCBFMini.as_file(detector, beam, None, None, flex.int(data), str(path))
        paths.append(path)
    return paths


def linked_import(originals, directory: pathlib.Path, n_images: int) -> pathlib.Path:
    """n_images names for the originals (cycled), imported as stills."""
    directory.mkdir(parents=True, exist_ok=True)
    links = []
    for i in range(n_images):
        link = directory / f"image_{i + 1:05d}.cbf"
        if not link.is_symlink():
            link.symlink_to(originals[i % len(originals)].resolve())
        links.append(link.name)
    expt = directory / "imported.expt"
    if not expt.is_file():
        run_command(["dials.import", *links, "output.experiments=imported.expt",
                     "convert_sequences_to_stills=True"], directory, "import.out")
    return expt


def _proc_kb(pid: int, field: str) -> int:
    path = f"/proc/{pid}/smaps_rollup" if field == "Pss:" else f"/proc/{pid}/status"
    try:
        for line in pathlib.Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class MemorySampler(threading.Thread):
    """Samples (seconds, main RSS MB, tree PSS MB, number of readers) every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self._done = threading.Event()

    def run(self):
        start = time.perf_counter()
        while not self._done.is_set():
            readers = _children(self.pid)
            rss = _proc_kb(self.pid, "VmRSS:")
            pss = sum(_proc_kb(p, "Pss:") for p in [self.pid, *readers])
            if rss:
                self.samples.append((time.perf_counter() - start, rss / 1024, pss / 1024, len(readers)))
            time.sleep(self.interval)

    def stop(self):
        self._done.set()
        self.join()


def measured_run(expt, model, nproc, batch_size, workdir: pathlib.Path) -> dict:
    args = [diffnet_script("predict"), expt, f"model.crystal={model}", f"nproc={nproc}", f"batch_size={batch_size}",
            "output.experiments=None"]
    load_before = load_average()
    start = time.perf_counter()
    process = subprocess.Popen([str(a) for a in args], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = MemorySampler(process.pid)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(stderr.decode()[-2000:])
    during = [s for s in sampler.samples if s[3] > 0] or sampler.samples  # while readers were running
    thirds = np.array_split(np.array(during), 3)
    return {
        "seconds": seconds,
        "load": f"{load_before} -> {load_average()}",
        "peak_main_rss_mb": max(s[1] for s in sampler.samples),
        "peak_tree_pss_mb": max(s[2] for s in sampler.samples),
        # mean tree PSS over the first, middle and last third of the image loop: flat means no growth
        "tree_pss_by_third_mb": [float(t[:, 2].mean()) for t in thirds if len(t)],
        "main_rss_by_third_mb": [float(t[:, 1].mean()) for t in thirds if len(t)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("bench_memory"))
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", type=pathlib.Path)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    model = (args.model or crystal_model(workdir)).resolve()
    originals = write_minicbf_stills(workdir / "distinct", N_DISTINCT)
    report = {"image_size": IMAGE_SIZE, "nproc": args.nproc, "batch_size": args.batch_size, "runs": {}}
    for n in (args.short, args.n_images):
        expt = linked_import(originals, workdir / f"images_{n}", n)
        result = measured_run(expt, model, args.nproc, args.batch_size, expt.parent)
        report["runs"][n] = result
        print(f"{n:6d} images: {n / result['seconds']:.1f} images/s, peak main RSS {result['peak_main_rss_mb']:.0f} MB, "
              f"peak PSS (main + readers) {result['peak_tree_pss_mb']:.0f} MB, "
              f"PSS by third of the run {[round(v) for v in result['tree_pss_by_third_mb']]} MB  (load {result['load']})",
              flush=True)
    short, long = (report["runs"][n] for n in (args.short, args.n_images))
    report["peak_rss_growth_mb"] = long["peak_main_rss_mb"] - short["peak_main_rss_mb"]
    report["peak_pss_growth_mb"] = long["peak_tree_pss_mb"] - short["peak_tree_pss_mb"]
    print(f"peak growth from {args.short} to {args.n_images} images: main RSS {report['peak_rss_growth_mb']:+.0f} MB, "
          f"main + readers PSS {report['peak_pss_growth_mb']:+.0f} MB")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
