"""diffnet.predict against DIALS and against bare reading, on the same images in the same run.

For each image set:
  (a)  bare dxtbx reading: imageset.get_raw_data(i) over every image, one process
       (and with nproc processes, the read-limited rate for that many readers);
  (a*) the nproc-process read again: with the allocator setting diffnet's readers
       use (inference.reuse_freed_memory); with diffnet's own raw read (numpy for
       uncompressed CBF, where cbflib copies element by element); and reading the
       files' bytes only, the floor under any reader (READ_MODES);
  (b)  what users run today: dials.find_spots nproc=<cores>, then the per-image
       resolution estimate dials.spot_counts_per_image (per_image_analysis
       estimated_d_min), both timed, plus that estimate in-process;
  (b') the same DIALS commands on nproc shares of the experiments at once, one
       core each: DIALS 3.12 finds spots on one still ImageSet at a time with one
       job, so this is the best rate its commands reach on these cores;
  (c)  diffnet.predict end to end as a subprocess (start-up included), and
       in-process with the model loaded and the grid map built (start-up excluded).
Image sets: simulated Pilatus 6M stills written as a Pilatus writes them
(miniCBF, byte-offset; --sim-format cbf: uncompressed full imgCIF/CBF read
through cbflib), and every dataset in shared/realdata, each dials.import'ed
into a scratch directory.
Page caches are warmed first, so every method reads the same cached files.

With CUDA present it also sweeps model-only throughput (batch, float32/bf16/fp16,
channels-last) and times end to end with many readers.

    python benchmarks/bench_vs_dials.py --workdir /tmp/bench_vs_dials --n-sim 120
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import platform
import time

from common import (
    crystal_model,
    diffnet_script,
    image_files,
    load_average,
    run_command,
    warm_page_cache,
    write_json,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


# --- image sets ------------------------------------------------------------------------------


SIM_FORMATS = {  # --sim-format: diffnet.simulate arguments, detector, and the set's name in the report
    "minicbf": (["format=minicbf"], "pilatus6m", "simulated Pilatus 6M stills, miniCBF (byte-offset, as a Pilatus writes)"),
    "cbf": (["format=cbf", "compress=False"], "pilatus6m", "simulated Pilatus 6M stills, uncompressed full CBF"),
    "nexus": (["format=nexus"], "eiger16m",
              "simulated Eiger 16M stills, one NXmx file (bitshuffle-LZ4, as an Eiger writes)"),
}
IMAGE_FILES = ("shot_*.cbf", "shots_*.nxs")


def simulated_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for pattern in IMAGE_FILES for p in directory.glob(pattern))


def simulate_stills(directory: pathlib.Path, n_images: int, seed: int, sim_format: str) -> list[pathlib.Path]:
    """Stills all sharing one geometry as in a serial experiment (a NeXus run: one file holds them all)."""
    directory = directory.resolve()
    arguments, detector, _ = SIM_FORMATS[sim_format]
    if not (directory / "index.json").is_file():
        run_command(
            [
                diffnet_script("simulate"), f"n_images={n_images}", f"seed={seed}", f"recipe.detectors={detector}",
                f"recipe.images_per_geometry={n_images}", *arguments,
                f"output.directory={directory}", f"output.log={directory}.log",
            ],
            cwd=directory.parent,
        )
    return simulated_files(directory)


def realdata_sets() -> dict[str, list[pathlib.Path]]:
    """Every real dataset: one file each, the l-cysteine frames together."""
    sets = {p.name.split(".")[0]: [p] for p in sorted(REALDATA.iterdir()) if p.is_file() and p.name != "README.md"}
    sets["l_cysteine"] = sorted((REALDATA / "l_cysteine").iterdir())
    return sets


def dials_import(files, directory: pathlib.Path, *options) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    run_command(["dials.import", *files, "output.experiments=imported.expt", *options], cwd=directory,
                log_name="import.out")
    return directory / "imported.expt"


# --- (a) bare reading ------------------------------------------------------------------------


READ_MODES = {  # key suffix in the results -> what each reading process does per image
    "": "dxtbx imageset.get_raw_data",
    "_tuned": "dxtbx imageset.get_raw_data, diffnet's allocator setting",
    "_diffnet": "diffnet's raw read (images._raw_panels: numpy for uncompressed CBF, else dxtbx), its allocator setting",
    "_files": "the files' bytes only (no decoding): the floor under any reader",
}


def _read_share(expt_path, share, n_shares, barrier, seconds, mode=""):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.images import _raw_panels, iter_image_refs
    from dials_diffnet.inference import reuse_freed_memory

    if mode in ("_tuned", "_diffnet"):
        reuse_freed_memory()
    refs = list(iter_image_refs(ExperimentListFactory.from_json_file(str(expt_path), check_format=True)))
    barrier.wait()  # time the reading only, not loading the experiment list
    start = time.perf_counter()
    if mode == "_files":  # every file once, however many images it holds (NeXus)
        for path in sorted({ref.path for ref in refs})[share::n_shares]:
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        seconds[share] = time.perf_counter() - start
        return
    for ref in refs[share::n_shares]:
        if mode == "_diffnet":
            _raw_panels(ref.imageset, ref.index, ref.imageset.get_detector(ref.index))
        else:
            ref.imageset.get_raw_data(ref.index)
        ref.imageset.clear_cache()  # as diffnet's readers do: dxtbx otherwise keeps every still it read
    seconds[share] = time.perf_counter() - start


def time_bare_read(expt_path, nproc: int, mode: str = "") -> float:
    """Seconds to read every raw frame with nproc processes reading interleaved shares.

    Fresh (spawned) processes, so no allocator setting leaks in from an earlier
    in-process diffnet run; mode: one of READ_MODES."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(nproc)
    seconds = context.Array("d", nproc)
    workers = [context.Process(target=_read_share, args=(expt_path, k, nproc, barrier, seconds, mode))
               for k in range(nproc)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return max(seconds)


# --- (b) DIALS ---------------------------------------------------------------------------------


def per_image_d_min(expt_path, refl_path) -> list[float]:
    """DIALS's per-image resolution estimate (what dials.spot_counts_per_image computes)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.evaluate import dials_stats_per_image

    experiments = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    reflections = flex.reflection_table.from_file(str(refl_path))
    reflections.centroid_px_to_mm(experiments)
    reflections.map_centroids_to_reciprocal_space(experiments)
    d_min = []
    for i, experiment in enumerate(experiments):
        stats = dials_stats_per_image(experiment, reflections.select(reflections["id"] == i))
        d_min.extend(stats.estimated_d_min)
    return d_min


def _dials_commands(expt_path, nproc: int, tag: str = "") -> tuple[float, float]:
    """dials.find_spots then dials.spot_counts_per_image on one .expt: (seconds, seconds)."""
    cwd = expt_path.parent
    strong = f"strong{tag}.refl"
    find_spots = run_command(
        ["dials.find_spots", expt_path, f"nproc={nproc}", f"output.reflections={strong}",
         f"output.log=dials.find_spots{tag}.log"], cwd, f"find_spots{tag}.out"
    )
    spot_counts = run_command(
        ["dials.spot_counts_per_image", expt_path, strong, f"json=per_image{tag}.json"], cwd, f"spot_counts{tag}.out"
    )
    return find_spots, spot_counts


def time_dials(expt_path, nproc: int) -> dict:
    try:
        find_spots, spot_counts = _dials_commands(expt_path, nproc)
    except RuntimeError as e:  # e.g. too many strong pixels on a raw CSPAD frame with default parameters
        return {"failed": " ".join(str(e).split())[-300:]}
    start = time.perf_counter()
    d_min = per_image_d_min(expt_path, expt_path.parent / "strong.refl")
    in_process = time.perf_counter() - start
    return {
        "find_spots_s": find_spots,
        "spot_counts_per_image_s": spot_counts,
        "per_image_d_min_in_process_s": in_process,
        "images_with_d_min_estimate": sum(d > 0 for d in d_min),
    }


def time_dials_split(expt_path, nproc: int) -> dict | None:
    """(b'): the experiments cut into nproc shares, each share's DIALS commands run at once on one core.

    Wall time is the slowest share. None when there are fewer experiments than shares."""
    from concurrent.futures import ThreadPoolExecutor

    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    if nproc < 2 or len(experiments) < nproc:
        return None
    shares = []
    for k in range(nproc):
        path = expt_path.parent / f"share_{k}.expt"
        experiments[k::nproc].as_file(str(path))
        shares.append(path)
    start = time.perf_counter()
    with ThreadPoolExecutor(nproc) as pool:
        per_share = list(pool.map(lambda k: _dials_commands(shares[k], 1, f"_share_{k}"), range(nproc)))
    return {"wall_s": time.perf_counter() - start, "per_share_s": per_share}


# --- (c) diffnet.predict -------------------------------------------------------------------------


def time_diffnet(expt_path, model, nproc: int, batch_size: int, device="cpu", repeats: int = 3, views: int = 2) -> dict:
    """End to end as a subprocess, then in-process with start-up (imports, model, grid map) excluded.

    Each is run `repeats` times and the median kept: single runs of a few seconds move by
    tens of percent on a shared 2-core machine (all runs are in the report)."""
    import statistics

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.images import iter_image_refs
    from dials_diffnet.inference import CrystalTask, predict_images, prewarm_grid_maps

    cwd = expt_path.parent
    subprocess_runs = [
        run_command(
            [diffnet_script("predict"), expt_path, f"model.crystal={model}", f"nproc={nproc}",
             f"batch_size={batch_size}", f"device={device}", f"views={views}"],
            cwd,
        )
        for _ in range(repeats)
    ]
    task = CrystalTask(model, device, views)
    refs = list(iter_image_refs(ExperimentListFactory.from_json_file(str(expt_path), check_format=False)))
    prewarm_grid_maps(refs, task.grid)
    in_process_runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        records = predict_images(task, expt_path, refs, batch_size=batch_size, nproc=nproc)
        in_process_runs.append(time.perf_counter() - start)
    return {
        "subprocess_s": statistics.median(subprocess_runs),
        "in_process_s": statistics.median(in_process_runs),
        "subprocess_runs_s": subprocess_runs,
        "in_process_runs_s": in_process_runs,
        "images_judged": sum(r.ok for r in records),
        "failures": sorted({r.failure for r in records if not r.ok}),
    }


# --- one image set -------------------------------------------------------------------------------


def bench_set(name, expt_path, model, nproc, batch_size, views=2) -> dict:
    files = image_files(expt_path)
    n_bytes = warm_page_cache(files)
    result = {"set": name, "n_images": None, "n_files": len(files), "bytes": n_bytes, "nproc": nproc, "views": views}
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.images import iter_image_refs

    n = len(list(iter_image_refs(ExperimentListFactory.from_json_file(str(expt_path), check_format=False))))
    result["n_images"] = n
    print(f"\n== {name}: {n} images, {n_bytes / 1e6:.0f} MB", flush=True)

    def measure(label, f):
        load_before = load_average()
        value = f()
        result.setdefault("load", {})[label] = f"{load_before} -> {load_average()}"
        print(f"  {label}: {value}  (load {result['load'][label]})", flush=True)
        return value

    result["read_1proc_s"] = measure("(a) bare read, 1 process", lambda: time_bare_read(expt_path, 1))
    if nproc > 1:
        result[f"read_{nproc}proc_s"] = measure(f"(a) bare read, {nproc} processes", lambda: time_bare_read(expt_path, nproc))
    for mode in ("_tuned", "_diffnet", "_files"):
        result[f"read_{nproc}proc{mode}_s"] = measure(
            f"(a{mode}) {nproc} processes, {READ_MODES[mode]}", lambda: time_bare_read(expt_path, nproc, mode)
        )
    result["dials"] = measure("(b) DIALS", lambda: time_dials(expt_path, nproc))
    if "failed" not in result["dials"]:
        split = measure(f"(b') DIALS on {nproc} shares at once", lambda: time_dials_split(expt_path, nproc))
        if split:
            result["dials_split"] = split
    result["diffnet"] = measure("(c) diffnet.predict",
                                lambda: time_diffnet(expt_path, model, nproc, batch_size, views=views))
    result["rates"] = rates(result)
    return result


def rates(r) -> dict:
    n = r["n_images"]
    out = {
        "a_read_1proc": n / r["read_1proc_s"],
        "c_diffnet_subprocess": n / r["diffnet"]["subprocess_s"],
        "c_diffnet_in_process": n / r["diffnet"]["in_process_s"],
    }
    if "failed" not in r["dials"]:
        out["b_dials"] = n / (r["dials"]["find_spots_s"] + r["dials"]["spot_counts_per_image_s"])
        out["b_find_spots_only"] = n / r["dials"]["find_spots_s"]
    if "dials_split" in r:
        out["b_dials_shares"] = n / r["dials_split"]["wall_s"]
    read_keys = [f"{r['nproc']}proc{mode}" for mode in READ_MODES]
    for key in read_keys:
        if f"read_{key}_s" in r:
            out[f"a_read_{key}"] = n / r[f"read_{key}_s"]
    for c in ("c_diffnet_subprocess", "c_diffnet_in_process"):
        for b in ("b_dials", "b_dials_shares"):
            if b in out:
                out[f"{c} / {b}"] = out[c] / out[b]
        out[f"{c} / a_read_1proc"] = out[c] / out["a_read_1proc"]
        for key in read_keys:
            if f"a_read_{key}" in out:
                out[f"{c} / a_read_{key}"] = out[c] / out[f"a_read_{key}"]
    return out


def combine(results, name) -> dict:
    """Several small sets as one: times summed, so fixed costs weigh as they did (sets DIALS failed on left out)."""
    results = [r for r in results if "failed" not in r["dials"]]
    total = {"set": name, "n_images": sum(r["n_images"] for r in results), "nproc": results[0]["nproc"]}
    keys = ["read_1proc_s", *(f"read_{total['nproc']}proc{mode}_s" for mode in READ_MODES)]
    keys = [k for k in keys if k in results[0]]
    for k in keys:
        total[k] = sum(r[k] for r in results)
    total["dials"] = {k: sum(r["dials"][k] for r in results) for k in ("find_spots_s", "spot_counts_per_image_s")}
    total["diffnet"] = {k: sum(r["diffnet"][k] for r in results) for k in ("subprocess_s", "in_process_s")}
    total["rates"] = rates(total)
    return total


def print_rates(result) -> None:
    print(f"\n-- {result['set']} ({result['n_images']} images): images/s and ratios")
    for k, v in result["rates"].items():
        print(f"  {k:45s} {v:8.3f}")


# --- GPU ---------------------------------------------------------------------------------------


def model_sweep(model_path, device: str, batches, dtypes, compile_model=False) -> list[dict]:
    """Model-only images/s on random input already on the device."""
    import torch

    from dials_diffnet.weights import load_model

    rows = []
    base, _ = load_model(model_path, device)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for channels_last in (False, True):
            model = base.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            runner = torch.compile(model) if compile_model else model
            for batch in batches:
                x = torch.randn(batch, 2, 256, 256, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
                with torch.inference_mode(), autocast:
                    for _ in range(3):
                        runner(x)
                    synchronize(device)
                    repeats = 10 if device != "cpu" else 2
                    start = time.perf_counter()
                    for _ in range(repeats):
                        runner(x)
                    synchronize(device)
                seconds = (time.perf_counter() - start) / repeats
                row = {"dtype": dtype_name, "channels_last": channels_last, "batch": batch, "images_per_s": batch / seconds}
                print(f"  model only {device} {dtype_name:8s} channels_last={channels_last!s:5s} batch {batch:5d}: "
                      f"{row['images_per_s']:9.0f} images/s", flush=True)
                rows.append(row)
    return rows


def synchronize(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gpu_section(model_path, expt_path, batch_size, compile_model) -> dict:
    from dials_diffnet.inference import available_cores

    print(f"\n== CUDA: {__import__('torch').cuda.get_device_name()}", flush=True)
    sweep = model_sweep(model_path, "cuda", (64, 256, 1024), ("float32", "bfloat16", "float16"), compile_model)
    readers = available_cores()
    read_s = time_bare_read(expt_path, readers)
    e2e = time_diffnet(expt_path, model_path, readers, batch_size, device="cuda")
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_diffnet.images import iter_image_refs

    n = len(list(iter_image_refs(ExperimentListFactory.from_json_file(str(expt_path), check_format=False))))
    result = {
        "model_only": sweep,
        "readers": readers,
        "read_limited_images_per_s": n / read_s,
        "end_to_end_images_per_s": n / e2e["in_process_s"],
    }
    result["end_to_end / read_limited"] = result["end_to_end_images_per_s"] / result["read_limited_images_per_s"]
    print(f"  {readers} readers: read-limited {result['read_limited_images_per_s']:.1f} images/s, "
          f"end to end {result['end_to_end_images_per_s']:.1f} images/s "
          f"(ratio {result['end_to_end / read_limited']:.2f})", flush=True)
    return result


# --- main -----------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("bench_vs_dials"))
    parser.add_argument("--n-sim", type=int, default=120, help="simulated Pilatus 6M stills (0: none)")
    parser.add_argument("--seed", type=int, default=606)
    parser.add_argument("--sim-format", choices=sorted(SIM_FORMATS), default="minicbf")
    parser.add_argument("--sim-dir", type=pathlib.Path, help="reuse stills simulated earlier (shot_*.cbf or shots_*.nxs)")
    parser.add_argument("--no-realdata", action="store_true")
    parser.add_argument("--model", type=pathlib.Path, help="crystal weights (default: shipped, else random)")
    parser.add_argument("--nproc", type=int, default=os.cpu_count(), help="DIALS nproc and diffnet readers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--views", type=int, default=2, help="diffnet.predict views= (2: its default for task=crystal)")
    parser.add_argument("--cpu-model-sweep", action="store_true", help="also sweep model-only throughput on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in the GPU sweep")
    parser.add_argument("--json", type=pathlib.Path, help="write all numbers here")
    args = parser.parse_args()

    import torch

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = (args.model or crystal_model(workdir)).resolve()
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "model": str(model),
        "nproc": args.nproc,
        "batch_size": args.batch_size,
        "views": args.views,
        "load_at_start": load_average(),
        "sets": [],
    }
    print(f"machine: {report['machine']}\nmodel: {model}\nload average at start: {report['load_at_start']}")

    sim_expt = None
    if args.n_sim:
        stills = (
            simulated_files(args.sim_dir)[: args.n_sim]
            if args.sim_dir
            else simulate_stills(workdir / f"{SIM_FORMATS[args.sim_format][1]}_{args.sim_format}", args.n_sim, args.seed,
                                 args.sim_format)
        )
        # zero-oscillation miniCBFs would import as one-image sequences: stills, as serial data is processed
        sim_expt = dials_import([p.resolve() for p in stills], workdir / f"sim_{args.sim_format}",
                                "convert_sequences_to_stills=True")
        result = bench_set(SIM_FORMATS[args.sim_format][2], sim_expt, model, args.nproc, args.batch_size, args.views)
        report["sets"].append(result)
        print_rates(result)
    if not args.no_realdata and REALDATA.is_dir():
        real = []
        for name, files in realdata_sets().items():
            expt = dials_import(files, workdir / "realdata" / name)
            real.append(bench_set(f"realdata {name}", expt, model, args.nproc, args.batch_size, args.views))
            print_rates(real[-1])
        report["sets"].extend(real)
        report["realdata_total"] = combine(real, "realdata, all sets together")
        print_rates(report["realdata_total"])

    if args.cpu_model_sweep:
        print("\n== CPU model-only sweep")
        report["cpu_model_only"] = model_sweep(model, "cpu", (1, 16, 64), ("float32", "bfloat16"))
    if torch.cuda.is_available() and sim_expt is not None:
        report["cuda"] = gpu_section(model, sim_expt, max(args.batch_size, 64), args.compile)
    else:
        print("\nNo CUDA device here: GPU section skipped.")
    report["load_at_end"] = load_average()
    if args.json:
        write_json(args.json, report)
        print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
