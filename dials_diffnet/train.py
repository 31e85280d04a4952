"""Training: one generic loop, `fit`, and the crystallography task that uses it.

`fit(model, loss_fn, train_loader, val_loader, ...)` knows nothing about
diffraction: it takes any model whose forward returns a dict of tensors, a
loss function `loss_fn(outputs, labels) -> (loss, {name: float})` and loaders
of `(x, labels)` batches. AdamW, linear warm-up then cosine decay, gradient
clipping; channels-last, and bf16 autocast on CUDA (on CPU when asked: `precision`). After every epoch it writes
a checkpoint (safetensors for tensors, JSON for the rest; nothing pickled), and
`resume=True` carries on from the last one with the same result as an
uninterrupted run: the data order and augmentation are functions of
(seed, epoch), and the torch RNG state is saved.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
import platform
import time

import torch
from safetensors.torch import load_file, save_file

from dials_diffnet import evaluate
from dials_diffnet.datasets import ShardDataset, ShardSampler, split_indices
from dials_diffnet.models import build
from dials_diffnet.models.grow import grow_into
from dials_diffnet.models.resnet import CrystalNet
from dials_diffnet.representation import PLANE_NAMES, REPRESENTATION_VERSION
from dials_diffnet.weights import load_model, save_model, sha256

logger = logging.getLogger("dials.diffnet.train")

# Resolution is learnt as log(1/d): an error of RESOLUTION_SCALE in it (5% in d) costs about 1.
RESOLUTION_SCALE = 0.05


def crystal_loss(outputs: dict, labels: dict, hit_weight: float = 1.0, multi_weight: float = 1.0):
    """Hit loss on every image; resolution and multi-lattice losses on hits only.

    Edge-limited labels say "at least this good", so predicting a resolution at
    least as good as the label costs nothing there (a one-sided hinge).
    The weights scale the hit and multi-lattice terms against the resolution term;
    the logged parts are unweighted, so runs with different weights compare.
    """
    hit = labels["is_hit"].bool()
    hit_loss = torch.nn.functional.binary_cross_entropy_with_logits(outputs["hit_logit"], hit.float())
    n_hits = hit.sum().clamp(min=1)

    s_true = torch.where(hit, labels["s_min"].float(), torch.ones_like(outputs["s_min"]))  # blanks carry no 1/d
    log_ratio = torch.log(outputs["s_min"].clamp(min=1e-6)) - torch.log(s_true)
    log_ratio = torch.where(labels["edge_limited"].bool(), log_ratio.clamp(max=0.0), log_ratio)
    per_image = torch.nn.functional.smooth_l1_loss(log_ratio / RESOLUTION_SCALE, torch.zeros_like(log_ratio), reduction="none")
    resolution_loss = (per_image * hit).sum() / n_hits

    multi = torch.nn.functional.binary_cross_entropy_with_logits(outputs["multi_logit"], labels["is_multi"].float(), reduction="none")
    multi_loss = (multi * hit).sum() / n_hits

    loss = resolution_loss + multi_weight * multi_loss + hit_weight * hit_loss
    return loss, {"resolution": resolution_loss.item(), "multi": multi_loss.item(), "hit": hit_loss.item()}


def lr_at(step: int, total_steps: int, max_lr: float, warmup_steps: int, final_fraction=0.01) -> float:
    """Linear warm-up to max_lr, then cosine decay to final_fraction * max_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(precision: str, device) -> str:
    """The arithmetic of the training steps' forward pass on `device`: "float32" or "bfloat16" (autocast).

    auto: bfloat16 on CUDA, float32 on CPU, where every shipped model was trained. bfloat16 on a CPU with
    AVX-512 BF16 or AMX runs a training step 2x faster (BENCHMARKS.md, training); weights, optimiser and
    loss stay float32 either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return precision


# oneDNN's channels-last convolutions corrupt the heap in training (forward + backward) on AVX2-only
# CPUs when a convolution has fewer than 8 output channels (torch 2.13.0 CPU; ResNet widths 2, 4 and
# 6 abort, 8 and up run): such narrow nets train channels-first on the CPU.
MIN_CHANNELS_LAST_CPU_WIDTH = 8


def training_memory_format(model, device) -> torch.memory_format:
    """channels-last (oneDNN's and cuDNN's fast layout: 1.3-1.5x a float32 CPU step), except for CPU
    training of a net with a convolution narrower than MIN_CHANNELS_LAST_CPU_WIDTH."""
    narrowest = min((m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), default=None)
    if torch.device(device).type == "cpu" and narrowest is not None and narrowest < MIN_CHANNELS_LAST_CPU_WIDTH:
        return torch.contiguous_format
    return torch.channels_last


def fit(
    model,
    loss_fn,
    train_loader,
    val_loader,
    *,
    epochs: int,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    grad_clip: float = 1.0,
    device="cpu",
    checkpoint_dir=None,
    resume: bool = False,
    config: dict | None = None,
    val_metrics=None,
    precision: str = "auto",
) -> dict:
    """Train `model` in place; returns {"history": [per-epoch dicts], "wall_time_s": float}.

    val_metrics(outputs) -> {name: float}, called with the model's outputs over
    the whole validation loader (CPU tensors, in loader order). `config` is stored
    in checkpoints; resuming with a different config (other than `epochs`) is refused.
    """
    device = torch.device(device)
    bf16_steps = resolve_precision(precision, device) == "bfloat16"
    memory_format = training_memory_format(model, device)
    model.to(device).to(memory_format=memory_format)
    # No weight decay on biases and BatchNorm parameters.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, int(warmup_fraction * total_steps))

    start_epoch, history, wall_time = 0, [], 0.0
    if resume and checkpoint_dir and (pathlib.Path(checkpoint_dir) / "last.json").is_file():
        state = load_checkpoint(checkpoint_dir, model, optimizer, device, config)
        start_epoch, history, wall_time = state["epoch"], state["history"], state["wall_time_s"]
        logger.info("Resumed from %s at epoch %d", checkpoint_dir, start_epoch)
    elif resume:
        logger.info("No checkpoint in %s: starting from scratch", checkpoint_dir)

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        for part in (train_loader.sampler, train_loader.batch_sampler, train_loader.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

        # ---- train one epoch
        model.train()
        totals, n_batches = {}, 0
        for i, (x, labels) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, lr, warmup_steps)
            x = evaluate.batch_to(x, device, memory_format)
            labels = {k: v.to(device, non_blocking=True) for k, v in labels.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_steps):
                outputs = model(x)
            loss, parts = loss_fn({k: v.float() for k, v in outputs.items()}, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            for k, v in {"loss": loss.item(), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v
            n_batches += 1

        # ---- validate
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        record.update({f"train_{k}": v / max(1, n_batches) for k, v in totals.items()})
        if val_loader is not None and len(val_loader.dataset):
            outputs, labels = evaluate.run_model(model, val_loader, device, memory_format)
            val_loss, val_parts = loss_fn(outputs, labels)
            record["val_loss"] = val_loss.item()
            record.update({f"val_{k}": v for k, v in val_parts.items()})
            if val_metrics is not None:
                record.update({f"val_{k}": v for k, v in val_metrics(outputs).items()})
        record["seconds"] = time.perf_counter() - t0
        wall_time += record["seconds"]
        history.append(record)
        logger.info("epoch %d/%d  %s", epoch + 1, epochs, "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))

        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, model, optimizer, epoch + 1, history, wall_time, config)
    model.to(memory_format=torch.contiguous_format)
    return {"history": history, "wall_time_s": wall_time}


# ---------------------------------------------------------------- checkpoints (safetensors + JSON, no pickle)


def save_checkpoint(directory, model, optimizer, epoch, history, wall_time_s, config):
    """Tensors to epoch_NNNN.safetensors, everything else to last.json (written last, atomically)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, param_state in optimizer_state["state"].items():
        for name, value in param_state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    name = f"epoch_{epoch:04d}.safetensors"
    save_file(tensors, str(directory / name))
    meta = {
        "epoch": epoch,
        "tensors": name,
        "sha256": sha256(directory / name),
        "param_groups": optimizer_state["param_groups"],
        "history": history,
        "wall_time_s": wall_time_s,
        "config": config or {},
    }
    tmp = directory / "last.json.tmp"
    tmp.write_text(json.dumps(evaluate.json_safe(meta), indent=1) + "\n")
    os.replace(tmp, directory / "last.json")
    for old in directory.glob("epoch_*.safetensors"):  # keep only the checkpoint last.json names
        if old.name != name:
            old.unlink()


def load_checkpoint(directory, model, optimizer, device, config=None) -> dict:
    """Restore model, optimiser and RNG state in place; returns last.json's content."""
    directory = pathlib.Path(directory)
    meta = json.loads((directory / "last.json").read_text())
    ignore = {"epochs"}
    saved = {k: v for k, v in meta["config"].items() if k not in ignore}
    if config is not None and saved != {k: v for k, v in config.items() if k not in ignore}:
        raise ValueError(f"checkpoint in {directory} was made with other settings: {meta['config']}")
    path = directory / meta["tensors"]
    if sha256(path) != meta["sha256"]:
        raise ValueError(f"checkpoint {path} does not match its checksum in last.json")
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value  # load_state_dict moves it to the parameter's device
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


# ---------------------------------------------------------------- the crystallography task

# Used when a dataset's index.json recipe does not define its labels.
DEFAULT_LABEL_DEFINITIONS = {
    "s_min": "resolution as |q| = 1/d (1/Angstrom) where the expected shell-mean I/sigma(I) of the "
    "simulated reflections falls below the simulator's threshold; d_min = 1/s_min",
    "edge_limited": "the label is limited by the detector edge: true resolution is at least this good",
    "is_multi": "at least two lattices each contributing the simulator's stated share of detectable spots",
    "is_hit": "enough detectable spots to index (10, as dials.ssx_index)",
}


def train_crystal(params) -> dict:
    """Train a CrystalNet from `params` (the diffnet.train PHIL extract); returns the model card written."""
    torch.manual_seed(params.seed)
    if params.threads:
        torch.set_num_threads(params.threads)
    device = evaluate.resolve_device(params.device)

    data = ShardDataset(params.data.train, augment=params.augment, seed=params.seed, planes=params.model.planes)
    train_idx, val_idx = split_indices(data, params.data.val_fraction, params.seed)
    if len(train_idx) == 0:
        raise ValueError("no training images: check data.train and data.val_fraction")
    train_set, val_set = data.subset(train_idx), data.subset(val_idx, augment=False)
    logger.info("Images: %d train, %d validation, from %d shards", len(train_set), len(val_set), len(data.shards))

    window = None if data.memory_mapped() else 3  # compressed shards: read a few at a time
    loader_args = dict(batch_size=params.batch_size, num_workers=params.workers, pin_memory=device.type == "cuda",
                       persistent_workers=params.workers > 0)
    train_loader = torch.utils.data.DataLoader(
        train_set, sampler=ShardSampler(train_set, params.seed, window), drop_last=len(train_set) > params.batch_size, **loader_args
    )
    val_loader = torch.utils.data.DataLoader(val_set, **loader_args)

    architecture = {"class": "CrystalNet", "depth": params.model.depth, "width": params.model.width,
                    "in_channels": params.model.planes, "radius_channel": params.model.radius_channel}
    model = build(architecture)
    initialised_from = initialise_from(model, params.model.init) if params.model.init else None
    config = {
        "architecture": architecture,
        "data": [str(pathlib.Path(d).resolve()) for d in params.data.train],
        "val_fraction": params.data.val_fraction,
        "batch_size": params.batch_size,
        "lr": params.lr,
        "weight_decay": params.weight_decay,
        "augment": params.augment,
        "seed": params.seed,
        "epochs": params.epochs,
        "precision": resolve_precision(params.precision, device),
        "initialised_from": initialised_from,
        "loss_weights": {"hit": params.loss.hit_weight, "multi": params.loss.multi_weight},
    }
    val_labels = val_set.labels

    def val_metrics(outputs):
        return evaluate.summary(evaluate.crystal_metrics(evaluate.crystal_predictions(outputs), val_labels, summary_only=True))

    result = fit(
        model, functools.partial(crystal_loss, hit_weight=params.loss.hit_weight, multi_weight=params.loss.multi_weight),
        train_loader, val_loader,
        epochs=params.epochs, lr=params.lr, weight_decay=params.weight_decay, device=device,
        checkpoint_dir=params.checkpoint.directory, resume=params.checkpoint.resume, config=config,
        val_metrics=val_metrics, precision=config["precision"],
    )

    final = None
    if len(val_set):
        final, _ = evaluate.evaluate_crystal(model, val_set, device, params.batch_size, params.workers)
    model.to("cpu")
    card = {
        "name": pathlib.Path(params.output.weights).stem,
        "task": "crystal",
        "architecture": architecture,
        "representation_version": REPRESENTATION_VERSION,
        "input_planes": list(PLANE_NAMES[: params.model.planes]),  # representation.represent(..., planes)
        "grid": list(data.grid),
        "outputs": {
            "s_min": "predicted resolution as 1/d (1/Angstrom); d_min = 1/s_min",
            "multi_logit": "logit of P(multi-lattice), meaningful on hits",
            "hit_logit": "logit of P(hit)",
        },
        "labels": _label_definitions(data),
        "training": {
            "data": [
                {"directory": d, **{k: v for k, v in ix.items() if k not in ("shards", "label_definitions")}}
                for d, ix in zip(config["data"], data.indexes)
            ],
            "n_train": len(train_set),
            "n_val": len(val_set),
            "split": "per image: val if hash(image seed, seed) < val_fraction (datasets.split_indices)",
            **{k: v for k, v in config.items() if k not in ("architecture", "data")},
            "optimiser": "AdamW, linear warm-up 5% then cosine to 1% of lr, grad clip 1.0",
            "loss": f"{params.loss.hit_weight:g} BCE(hit) on all; on hits: {params.loss.multi_weight:g} BCE(multi) "
            f"+ smooth-L1(log(1/d) ratio / {RESOLUTION_SCALE}), one-sided for edge-limited labels",
            "augmentation": "random 90 degree rotations and flips of the grid" if params.augment else "none",
            "history": result["history"],
            "wall_time_s": round(result["wall_time_s"], 1),
            "device": _device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "validation": final,
    }
    return save_model(model, evaluate.json_safe(card), params.output.weights)


def initialise_from(model: CrystalNet, weights_path) -> dict:
    """Copy a trained crystal model's weights into `model` (in place; `models.grow.grow_into`: `model` may be
    wider, same depth, and read input planes the old one lacked); returns what it was."""
    old, card = load_model(weights_path)
    if card.get("task") != "crystal":
        raise ValueError(f"model.init={weights_path} is a {card.get('task')!r} model, not a crystal model")
    if type(old.backbone.stages[0]) is not type(model.backbone.stages[0]) \
            or len(old.backbone.stages) != len(model.backbone.stages):
        raise ValueError(f"model.init={weights_path} is a depth-{card['architecture']['depth']} model: depth must match")
    try:
        grow_into(model, old)
    except ValueError as e:
        raise ValueError(f"model.init={weights_path}: {e}") from None
    return {"name": card.get("name"), "version": card.get("version"), "sha256": card.get("sha256"),
            "architecture": card.get("architecture")}


def _label_definitions(data: ShardDataset) -> dict:
    for index in data.indexes:
        labels = index.get("label_definitions") or index.get("recipe", {}).get("labels")
        if labels:
            return labels
    return DEFAULT_LABEL_DEFINITIONS


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
