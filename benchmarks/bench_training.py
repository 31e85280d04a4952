"""Training-step time of the shipped architectures on this machine, by arithmetic and memory layout.

One AdamW step (forward, loss, backward, update) on a batch of 32 random 256 x 256 inputs, for the
crystal model (ResNet-18 width 16, 4 planes) and spi_multi (width 16, 2 planes), timed three ways:
  - float32, channels-first: how every shipped model was trained up to session 23;
  - float32, channels-last: train.fit's layout since (same arithmetic, oneDNN's fast path);
  - bfloat16 autocast, channels-last: `precision=bfloat16` (diffnet.train) / `--precision bfloat16`
    (spi.train); pays on CPUs with AVX-512 BF16 or AMX.
Median of the steps after two warm-up steps; ratios against the first.

    python benchmarks/bench_training.py --steps 8 --json /tmp/bench_training.json
"""

from __future__ import annotations

import argparse
import platform

import torch

from common import load_average, seconds_per_call, write_json

WAYS = {"float32, channels-first": (torch.contiguous_format, None),
        "float32, channels-last": (torch.channels_last, None),
        "bfloat16, channels-last": (torch.channels_last, torch.bfloat16)}


def models():
    from dials_diffnet.models.resnet import CrystalNet
    from dials_diffnet.models.spi import SpiMultiNet

    return {"crystal (ResNet-18 width 16, 4 planes)": (lambda: CrystalNet(depth=18, width=16, in_channels=4), 4),
            "spi_multi (width 16, 2 planes)": (lambda: SpiMultiNet(n_types=8, n_counts=4, width=16, patterson="flat"), 2)}


def seconds_per_step(make, planes: int, layout, dtype, steps: int) -> float:
    torch.manual_seed(0)
    model = make().to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(32, planes, 256, 256).contiguous(memory_format=layout)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            outputs = model(x)
        loss = sum(v.float().square().mean() for v in outputs.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return seconds_per_call(step, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, load {load_average()}, torch {torch.__version__}")
    results = {}
    for name, (make, planes) in models().items():
        base = None
        for way, (layout, dtype) in WAYS.items():
            seconds = seconds_per_step(make, planes, layout, dtype, args.steps)
            base = base or seconds
            results[f"{name}: {way}"] = {"seconds_per_step": round(seconds, 4), "speed_up": round(base / seconds, 2)}
            print(f"{name:40s} {way:26s} {seconds:6.3f} s a step of 32   x{base / seconds:.2f}", flush=True)
    if args.json:
        write_json(args.json, {"load_average": load_average(), "threads": args.threads, "results": results})


if __name__ == "__main__":
    main()
