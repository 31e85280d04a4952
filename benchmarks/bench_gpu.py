"""Model and simulator rates on an accelerator, without DIALS (a lent GPU machine has PyTorch but no DIALS).

bench_vs_dials.py needs DIALS on the machine it runs on; this one needs only the package's models, weights
and the SPI simulator (all import without DIALS), so it is the GPU check to run when a GPU is lent:

    PYTHONPATH=. python3 benchmarks/bench_gpu.py --json $OUT/gpu.json   # on the device: CUDA if present, else CPU
    python benchmarks/bench_gpu.py --device cpu --batches 2        # the same figures on this machine's CPU

It times, on one device, in one run:
  - inference of the shipped crystal, spi_multi and spi_twin networks (model only, random inputs of
    the representation's shape), float32 and bf16 autocast, channels-last: images per second;
  - training steps (AdamW, the crystal loss) of the crystal architecture at width 16 and 32, bf16: stills
    per second, to size a GPU training run;
  - the SPI simulator (`spi.simulate.simulate`) on the device against the CPU: shots per second.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import torch

from common import seconds_per_call, write_json


def inference_rates(device, batch: int, repeats: int) -> dict:
    from dials_diffnet.weights import load_model, shipped_path

    rates = {}
    for name in ("crystal", "spi_multi", "spi_twin"):
        model, card = load_model(shipped_path(name))
        model = model.to(device).to(memory_format=torch.channels_last).eval()
        planes = card["architecture"].get("in_channels", 2)
        x = torch.randn(batch, planes, 256, 256, device=device).to(memory_format=torch.channels_last)
        for precision, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            def step():
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    model(x)
            rates[f"{name} {precision}"] = round(batch / seconds_per_call(step, repeats, device), 1)
    return rates


def training_rates(device, batch: int, repeats: int) -> dict:
    from dials_diffnet.models.resnet import CrystalNet
    from dials_diffnet.train import crystal_loss

    rates = {}
    for width in (16, 32):
        torch.manual_seed(0)
        model = CrystalNet(depth=18, width=width, in_channels=3, radius_channel=True).to(device)
        model = model.to(memory_format=torch.channels_last).train()
        optimiser = torch.optim.AdamW(model.parameters(), 1e-4)
        x = torch.randn(batch, 3, 256, 256, device=device).to(memory_format=torch.channels_last)
        labels = {"s_min": torch.rand(batch, device=device) * 0.5 + 0.2, "edge_limited": torch.zeros(batch, dtype=torch.bool, device=device),
                  "is_hit": torch.ones(batch, dtype=torch.bool, device=device), "is_multi": torch.zeros(batch, dtype=torch.bool, device=device)}
        loss_fn = functools.partial(crystal_loss, hit_weight=4.0)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                outputs = model(x)
            loss, _ = loss_fn({k: v.float() for k, v in outputs.items()}, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        rates[f"crystal width {width} bf16"] = round(batch / seconds_per_call(step, repeats, device), 1)
    return rates


def simulator_rates(device, shots: int) -> dict:
    from dials_diffnet.spi.simulate import shot_params, simulate

    params = [shot_params(4_900_000 + i, "capsid", 1 + i % 4, "noisy", "test") for i in range(shots)]
    rates = {}
    for where in dict.fromkeys([device.type, "cpu"]):
        simulate(params[0], device=where)  # builds and caches the particle's transform on that device
        t = time.perf_counter()
        for p in params:
            simulate(p, device=where)
        rates[f"spi simulate on {where}"] = round(shots / (time.perf_counter() - t), 2)
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--batches", type=int, default=10, help="timed calls per figure (median)")
    parser.add_argument("--shots", type=int, default=8, help="SPI shots per simulator figure")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 32)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "batch": batch, "cpu_threads": torch.get_num_threads()}
    for name, measure in (("inference images/s", lambda: inference_rates(device, batch, args.batches)),
                          ("training stills/s", lambda: training_rates(device, batch, args.batches)),
                          ("simulator shots/s", lambda: simulator_rates(device, args.shots))):
        result[name] = measure()
        print(name, json.dumps(result[name]), flush=True)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
