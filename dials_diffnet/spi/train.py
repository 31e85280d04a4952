"""Train the shipped SPI models on one or two CPU threads.

    python -m dials_diffnet.spi.train [--out dials_diffnet/weights] [--cache /tmp/spi/data] [--scale 1.0]

1. Data: simulated pnCCD shots of the eight "seen" particle types, 1-4 particles,
   half noise-free and half noisy, each passed through `represent` on the model's
   grid (config grid_size: 256 cells for both; dataset.standard_sets; cached per
   grid). Seeds are disjoint from every test seed.
2. Multi-output CNN (SpiMultiNet): cross-entropy on the count head + cross-entropy
   on the type head, random 90-degree rotations and flips of the grid (a rotation
   about the beam; the gap then lies elsewhere, so the net does not lean on one
   detector layout). Both models train in `train.fit`, the loop the crystallography
   model uses (AdamW, warm-up then cosine decay, CUDA when present; the SPI configs
   set a 20 % warm-up and no gradient clipping), scored after every epoch on the
   validation sets (dataset.validation_sets).
3. Twin network (SpiTwinNet): triplet loss, semi-hard mining inside batches of 4
   count classes x K patterns. The classes are the particle counts, not (count, type):
   an embedding that groups patterns by count across eight different particles is
   what can still separate single from multiple hits of a particle it never saw.
4. Weights + model cards (dials_diffnet.weights.save_model).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import pathlib
import time

import numpy as np
import torch

from dials_diffnet.datasets import square_symmetry
from dials_diffnet.evaluate import resolve_device
from dials_diffnet.models.spi import SpiMultiNet, SpiTwinNet, fold_count_prior, grow_spi
from dials_diffnet.spi import SPI_GRID, spi_grid
from dials_diffnet.spi import simulate as sim
from dials_diffnet.spi.dataset import SEED_BASES, blank_specs, build, joined, standard_sets, validation_sets
from dials_diffnet.spi.particles import PARTICLE_TYPES, RANDOM_PREFIX, SEEN_TYPES, random_shape_index
from dials_diffnet.spi.triplet import batch_triplet_loss
from dials_diffnet.train import PRECISIONS, fit, resolve_precision
from dials_diffnet.weights import load_model, save_model

logger = logging.getLogger("dials.diffnet.spi.train")

# Small nets on few patterns: a long warm-up and no gradient clipping (as the one-cycle schedule
# these models were first trained with), not the crystallography defaults of train.fit.
# random_shapes: procedural particles (particles.random_shape) joining the seen types in training.
# grid_size: the model's input grid (spi_grid). Both models gained on 256 cells over 128 (docs/history/spi-training.md, sessions 7 and 8).
# MULTI epochs 30: at 20 its training accuracy was still climbing when the learning rate ran out.
# crowded_per_class: extra 3- and 4-particle training shots per (type, count, noise) (dataset.standard_sets).
# close_per_class: extra 2-4-particle shots per class with two particles overlapping in projection (dataset.close_specs).
# compact_per_class: extra 3-4-particle shots per class with a pair < 0.7 diameters apart in projection (the same).
# precision: train.fit's (auto: float32 on CPU, as every shipped SPI model was trained).
MULTI = dict(width=16, patterson="flat", epochs=30, batch=32, lr=3e-3, weight_decay=1e-4, warmup=0.2, grad_clip=0.0,
             random_shapes=0, seed=0, grid_size=256, train_per_class=75, crowded_per_class=0, close_per_class=0,
             compact_per_class=0, train_from=0, precision="auto")
TWIN = dict(width=8, patterson="log", embedding_size=32, margin=0.3, mining="semihard", epochs=20, per_class=16,
            lr=3e-3, warmup=0.2, grad_clip=0.0, random_shapes=128, seed=0, grid_size=256, train_per_class=75,
            crowded_per_class=0, close_per_class=0, compact_per_class=0, train_from=0, precision="auto")


# The hit head (`--only hit`): added to a trained spi_multi whose trunk and other heads stay frozen, trained on
# the trunk's features of hits (recipe shots per class train_from..train_per_class, which no spi_multi trained
# on) and noisy blanks; each pattern under `views` random square symmetries.
HIT = dict(epochs=30, batch=128, lr=1e-3, weight_decay=1e-4, warmup=0.05, seed=0, train_per_class=700,
           train_from=600, blanks=3200, validation_blanks=320, views=2)
HIT_OPERATING_POINTS = (0.5, 0.3, 0.2, 0.1, 0.05)


def load_sets(cache: pathlib.Path, scale: float = 1.0, workers: int = 2, validation: bool = False,
              random_shapes: int = 0, grid=SPI_GRID, names=None, train_per_class: int = 75,
              crowded_per_class: int = 0, close_per_class: int = 0, compact_per_class: int = 0,
              train_from: int = 0) -> dict:
    """The standard sets (train, test, unseen; random with `random_shapes`, crowded with
    `crowded_per_class`, close with `close_per_class`, compact with `compact_per_class`; those in `names` if given) on
    `grid`, or with `validation` the validation sets (under the names test and unseen, so evaluation code
    takes either). A train set that skips its first `train_from` shots per class has a cache of its own."""
    sets = validation_sets(scale) if validation else standard_sets(scale, random_shapes, train_per_class,
                                                                   crowded_per_class, close_per_class, compact_per_class,
                                                                   train_from)
    sets = {name: specs for name, specs in sets.items() if names is None or name in names}
    prefix = "validation_" if validation else ""

    def stem(name):
        return f"{name}_from{train_from}" if name == "train" and train_from and not validation else name

    return {
        name: build(specs, cache / f"grid{grid.size}" / f"{prefix}{stem(name)}{'' if scale == 1.0 else f'_x{scale:g}'}.npz",
                    workers, grid)
        for name, specs in sets.items()
    }


class PatternSet(torch.utils.data.Dataset):
    """In-memory patterns (or feature vectors) and their labels, as `train.fit` takes them.

    augment: every pattern under one of the grid's 8 square symmetries, drawn from
    (seed, epoch, item): a rotation about the beam and a flip. The detector gaps then
    lie elsewhere, so the nets do not lean on one detector layout.
    """

    def __init__(self, x: np.ndarray, labels: dict, augment: bool = False, seed: int = 0):
        self.x, self.labels, self.augment, self.seed, self.epoch = x, labels, augment, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment and x.ndim == 3:
            x = square_symmetry(x, (self.seed, self.epoch, i))
        return torch.from_numpy(np.asarray(x)), {k: torch.as_tensor(v[i]) for k, v in self.labels.items()}


class PKBatchSampler(torch.utils.data.Sampler):
    """Batches of `per_class` random patterns of every class, so every anchor has positives;
    a new draw per epoch from (seed, epoch)."""

    def __init__(self, labels: np.ndarray, per_class: int, seed: int = 0):
        self.labels, self.per_class, self.seed, self.epoch = np.asarray(labels), per_class, seed, 0
        self.classes = np.unique(self.labels)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return min(int((self.labels == c).sum()) for c in self.classes) // self.per_class

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        by_class = [rng.permutation(np.flatnonzero(self.labels == c)) for c in self.classes]
        k = self.per_class
        for b in range(len(self)):
            yield np.concatenate([ix[b * k : (b + 1) * k] for ix in by_class]).tolist()


NO_TYPE = -100  # procedural particles have a count but no particle type to learn


def multi_labels(data: dict) -> dict:
    return {"count": data["count"].astype(np.int64) - 1,
            "type": np.array([SEEN_TYPES.index(p) if p in SEEN_TYPES else NO_TYPE for p in data["particle"]], np.int64)}


def multi_loss(outputs: dict, labels: dict):
    """Cross-entropy on the count head plus cross-entropy on the type head (patterns with a type only)."""
    count = torch.nn.functional.cross_entropy(outputs["count_logits"], labels["count"])
    typed = labels["type"] != NO_TYPE
    kind = (torch.nn.functional.cross_entropy(outputs["type_logits"][typed], labels["type"][typed])
            if typed.any() else outputs["type_logits"].sum() * 0.0)
    right = (outputs["count_logits"].argmax(1) == labels["count"]).float().mean()
    return count + kind, {"count": count.item(), "type": kind.item(), "count_accuracy": right.item()}


@torch.no_grad()
def trunk_features(model: SpiMultiNet, x, views: int, seed: int, batch: int = 64) -> np.ndarray:
    """(len(x) * views, n_features): the frozen trunk's pooled features of every pattern under `views`
    random square symmetries (datasets.square_symmetry, drawn from (seed, view, row))."""
    model.eval()
    parts = []
    for view in range(views):
        for i in range(0, len(x), batch):
            rows = [square_symmetry(np.asarray(x[j]), (seed, view, j)) for j in range(i, min(i + batch, len(x)))]
            parts.append(model.trunk(torch.from_numpy(np.stack(rows)).float()).numpy())
    return np.concatenate(parts)


def hit_loss(outputs: dict, labels: dict):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(outputs["hit_logits"], labels["hit"].float())
    right = ((outputs["hit_logits"] > 0) == labels["hit"].bool()).float().mean()
    return loss, {"hit": loss.item(), "hit_accuracy": right.item()}


class HitHead(torch.nn.Module):
    """An spi_multi's hit head alone, on trunk features, as `train.fit` takes it."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, f):
        return {"hit_logits": self.head(f)[:, 0]}


def add_hit_head(model: SpiMultiNet, card: dict, hits: dict, blanks: dict, config: dict = HIT, device="cpu"):
    """(a copy of `model` with a trained hit head, per-epoch history). Only the head learns: the trunk and the
    count and type heads keep their weights, so their outputs do not change."""
    from dials_diffnet.models import build

    torch.manual_seed(config["seed"])
    net = build(dict(card["architecture"], hit_head=True))
    missing, unexpected = net.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("hit_head.") for k in missing):
        raise ValueError(f"{card.get('name')} does not fit SpiMultiNet: {unexpected or missing}")
    features = np.concatenate([trunk_features(net, hits["x"], config["views"], config["seed"]),
                               trunk_features(net, blanks["x"], config["views"], config["seed"])])
    labels = np.repeat([1, 0], [len(hits["x"]) * config["views"], len(blanks["x"]) * config["views"]])
    loader = torch.utils.data.DataLoader(PatternSet(features, {"hit": labels}), batch_size=config["batch"],
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(config["seed"]))
    result = fit(HitHead(net.hit_head), hit_loss, loader, None, epochs=config["epochs"], lr=config["lr"],
                 weight_decay=config["weight_decay"], warmup_fraction=config["warmup"], grad_clip=0.0, device=device)
    return net.to("cpu").eval(), result["history"]


def hit_operating_point(p_hit_hits: np.ndarray, noise: np.ndarray, p_hit_blanks: np.ndarray) -> dict:
    """The card's min_p_hit for `diffnet.filter task=spi` (rule B, docs/spi.md): the largest of
    HIT_OPERATING_POINTS keeping >= 99 % of the noisy hits and <= 1 % of the blanks, else 0.5."""
    rows = [{"min_p_hit": bar, "noisy_hits_kept": float(np.mean(p_hit_hits[noise == "noisy"] >= bar)),
             "clean_hits_kept": float(np.mean(p_hit_hits[noise == "clean"] >= bar)),
             "blanks_kept": float(np.mean(p_hit_blanks >= bar))} for bar in HIT_OPERATING_POINTS]
    passing = [r for r in rows if r["noisy_hits_kept"] >= 0.99 and r["blanks_kept"] <= 0.01]
    return {"min_p_hit": passing[0]["min_p_hit"] if passing else 0.5, "met": bool(passing), "candidates": rows}


class Embedding(torch.nn.Module):
    """`train.fit` takes models that return a dict of outputs; an embedding net returns a tensor."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"embedding": self.net(x)}


def triplet_objective(margin: float, mining: str):
    def loss(outputs: dict, labels: dict):
        value = batch_triplet_loss(outputs["embedding"], labels["count"], margin, mining)
        return value, {"triplet": value.item()}

    return loss


def train_multi(data: dict, config: dict = MULTI, seed: int = 0, validation: dict | None = None, device="cpu",
                init=None):
    """(model, per-epoch history); `validation` (a set like `data`) is scored after every epoch.
    `init`: a trained spi_multi to start from (a warm restart: its weights, a fresh schedule), of this
    width or narrower (`models.spi.grow_spi`: the wider net starts with its predictions).
    Unequal numbers of shots per count (the crowded set) are folded out of the count logits at the end,
    so the net reports counts as for equally likely 1-4 particles."""
    torch.manual_seed(seed)
    model = SpiMultiNet(n_types=len(SEEN_TYPES), width=config["width"], patterson=config["patterson"])
    if init is not None:
        grow_spi(model, init)
    loader = torch.utils.data.DataLoader(
        PatternSet(data["x"], multi_labels(data), augment=True, seed=seed), batch_size=config["batch"],
        shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed),
    )
    val_loader = None if validation is None else torch.utils.data.DataLoader(
        PatternSet(validation["x"], multi_labels(validation)), batch_size=256)
    result = fit(model, multi_loss, loader, val_loader, epochs=config["epochs"], lr=config["lr"],
                 weight_decay=config["weight_decay"], warmup_fraction=config["warmup"], grad_clip=config["grad_clip"],
                 device=device, precision=config["precision"])
    model = model.to("cpu").eval()
    fold_count_prior(model, count_frequencies(data))
    return model, result["history"]


def count_frequencies(data: dict) -> list[int]:
    """Training shots with 1, 2, ... MAX_COUNT particles."""
    return [int(np.sum(data["count"] == c)) for c in range(1, sim.MAX_COUNT + 1)]


def train_twin(data: dict, config: dict = TWIN, seed: int = 0, model: torch.nn.Module | None = None,
               validation: dict | None = None, device="cpu"):
    """(model, per-epoch history): triplet training of a SpiTwinNet, or of any `model` whose output is
    L2-normalised (the sweep's heads). `validation` (patterns of held-back types) is scored after
    every epoch by few-shot single-vs-multi accuracy."""
    from dials_diffnet.spi.evaluate import fewshot_scores

    torch.manual_seed(seed)
    if model is None:
        model = SpiTwinNet(embedding_size=config["embedding_size"], width=config["width"],
                           patterson=config["patterson"])
    loader = torch.utils.data.DataLoader(
        PatternSet(data["x"], {"count": data["count"]}, augment=True, seed=seed),
        batch_sampler=PKBatchSampler(data["count"], config["per_class"], seed),
    )
    val_loader = val_metrics = None
    if validation is not None:
        val_loader = torch.utils.data.DataLoader(PatternSet(validation["x"], {"count": validation["count"]}),
                                                 batch_size=256)

        def val_metrics(outputs):
            scores = fewshot_scores(outputs["embedding"].numpy(), validation["count"], validation["particle"])
            return {"single_vs_multi": scores["mean"]["single_vs_multi_4class_support"]}

    result = fit(Embedding(model), triplet_objective(config["margin"], config["mining"]), loader, val_loader,
                 epochs=config["epochs"], lr=config["lr"], weight_decay=1e-4, warmup_fraction=config["warmup"],
                 grad_clip=config["grad_clip"], device=device, val_metrics=val_metrics,
                 precision=config["precision"])
    return model.to("cpu").eval(), result["history"]


# Extra training sets of seen types (dataset.standard_sets) and how the card describes them.
EXTRA_SET_RECIPES = {
    "crowded": "dataset.standard_sets crowded: 3 and 4 particles only, otherwise as train",
    "close": "dataset.close_specs: 2-4 particles, closest pair < 0.5 diameters in projection, otherwise as train",
    "compact": "dataset.close_specs: 3-4 particles, closest pair < 0.7 diameters in projection, otherwise as train",
}


def simulator_card(sets: dict, random_shapes: int) -> dict:
    """What the training data were, so a card says exactly what the model has seen."""
    extra = random_patterns(sets, random_shapes) if random_shapes else None
    return {
        "simulator": "dials_diffnet.spi.simulate (coherent bead sums on a pnCCD-like detector)",
        "detector": {"pixel_mm": sim.PIXEL_MM, "frame": list(sim.FRAME_SHAPE), "gap_pixels": sim.GAP_PIXELS,
                     "beamstop_hole_radius_mm": sim.HOLE_RADIUS_MM},
        "geometry_pools": {k: [list(g) for g in v] for k, v in sim.GEOMETRY_POOLS.items()},
        "nominal_fluence_photons_per_um2": sim.NOMINAL_FLUENCE,
        "fluence_jitter_sigma_ln": sim.FLUENCE_JITTER,
        "noisy": f"Poisson photons + Gaussian readout sigma {sim.READOUT_SIGMA} photon, rounded to photons, clipped at 0",
        "clean": "expected photons, no noise",
        "separation_diameters": list(sim.SEPARATION_RANGE),
        "particle_types": {n: PARTICLE_TYPES[n].description for n in PARTICLE_TYPES},
        "train_patterns": int(len(sets["train"]["seed"])),
        "train_seeds": [int(sets["train"]["seed"].min()), int(sets["train"]["seed"].max())],
        **{f"{name}_{key}": value for name, recipe in EXTRA_SET_RECIPES.items() if name in sets
           for key, value in (("patterns", int(len(sets[name]["seed"]))),
                              ("seeds", [int(sets[name]["seed"].min()), int(sets[name]["seed"].max())]),
                              ("recipe", recipe))},
        **({"random_shape_patterns": int(len(extra["seed"])),
            "random_shapes": [f"{RANDOM_PREFIX}0", f"{RANDOM_PREFIX}{random_shapes - 1}"],
            "random_seeds": [int(extra["seed"].min()), int(extra["seed"].max())],
            "random_shape_recipe": "particles.random_shape(k): 1-4 fused ellipsoids, some hollow, ~11-80 nm"}
           if extra is not None else {}),
        "test_seeds_start_at": SEED_BASES["test"],
    }


LIMITATIONS = (
    "Trained only on simulated patterns (coarse-grained bead models, pnCCD-like detector, distance x wavelength "
    "2000-3200 mm*A) on a CPU; not validated on real SPI data. 4-class count accuracy (multi-output CNN) is "
    "below the 99 % target on noise-free patterns (figures in the evaluation block): 3 vs 4 particles is the main "
    "confusion, worst for particles that overlap in projection. Single-vs-multi is 99 % on seen types; the twin "
    "network's few-shot single-vs-multi on unseen types is in its evaluation block."
)
REPRODUCE = (
    "make train-spi (scripts/train_spi.sh: simulates and represents the data sets into $CACHE, trains both models "
    "from scratch, then spi_multi's warm restarts on growing training sets); figures: python -m "
    "dials_diffnet.spi.evaluate --cache $CACHE --weights dials_diffnet/weights --sweep --update-cards"
)


def card(name: str, model, config: dict, sets: dict, seconds: dict, extra: dict) -> dict:
    arch = {"class": type(model).__name__, **extra["architecture"]}
    return {
        "name": name,
        "task": "spi",
        "architecture": arch,
        "grid": {"size": config["grid_size"], "s_max": SPI_GRID.s_max},
        "input": "representation.represent on `grid` (channel 0 log1p counts minus median, channel 1 valid)",
        **{k: v for k, v in extra.items() if k != "architecture"},
        "training": {**config, **seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "data": simulator_card(sets, config["random_shapes"])},
        "parameters": sum(p.numel() for p in model.parameters()),
        "limitations": LIMITATIONS,
        "reproduce": REPRODUCE,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "weights"))
    parser.add_argument("--cache", default="/tmp/diffnet_spi_data")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the data sets (quick runs)")
    parser.add_argument("--epochs", type=int, default=None, help="override both models' epochs")
    parser.add_argument("--workers", type=int, default=2, help="simulation processes")
    parser.add_argument("--only", choices=("multi", "twin", "hit"),
                        help="train one model (run the two side by side); hit: add a hit head to the spi_multi "
                             "given by --init (its trunk and other heads frozen), trained on hits and blank frames")
    parser.add_argument("--patterson", choices=("log", "flat"), help="override both models' Patterson channel mode")
    parser.add_argument("--width", type=int, help="override both models' trunk width")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="override both models' training arithmetic (train.resolve_precision; auto: float32 on CPU)")
    parser.add_argument("--random-shapes", type=int,
                        help="override both models' number of procedural particles in the training data (0: none)")
    parser.add_argument("--seed", type=int, help="override both models' training seed")
    parser.add_argument("--grid-size", type=int, help="override both models' input grid (cells per side)")
    parser.add_argument("--train-per-class", type=int,
                        help="override both models' training shots per (type, count, noise) class (75: 4 800 shots)")
    parser.add_argument("--train-from", type=int,
                        help="skip the training set's first shots per class: with --train-per-class N, only shots "
                             "from this one to N (session 30's probe: 600 to 900, shots spi_multi's lineage never saw)")
    parser.add_argument("--crowded-per-class", type=int,
                        help="override both models' extra 3- and 4-particle shots per (type, count, noise) class")
    parser.add_argument("--close-per-class", type=int,
                        help="override both models' extra 2-4-particle shots per class with a pair overlapping in projection")
    parser.add_argument("--compact-per-class", type=int,
                        help="override both models' extra 3-4-particle shots per class with a pair < 0.7 diameters apart in projection")
    parser.add_argument("--lr", type=float, help="override both models' peak learning rate")
    parser.add_argument("--warmup", type=float, help="override both models' warm-up fraction of the schedule")
    parser.add_argument("--init", help="multi only: start from this trained spi_multi (its weights, a fresh "
                                       "schedule; its width or narrower, grown to --width): how spi_multi 0.6.0 "
                                       "continued 0.5.0")
    args = parser.parse_args(argv)
    if args.init and args.only not in ("multi", "hit"):
        parser.error("--init needs --only multi or --only hit")
    if args.only == "hit" and not args.init:
        parser.error("--only hit needs --init: the spi_multi to add the head to")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = pathlib.Path(args.out)

    multi_config, twin_config = dict(MULTI), dict(TWIN)
    for key in ("epochs", "patterson", "width", "random_shapes", "seed", "grid_size", "lr", "warmup",
                "train_per_class", "crowded_per_class", "close_per_class", "compact_per_class", "train_from",
                "precision"):
        if getattr(args, key) is not None:
            multi_config[key] = twin_config[key] = getattr(args, key)
    device = resolve_device(args.device)
    if args.only == "hit":
        hit_config = dict(HIT, **{k: getattr(args, k) for k in ("epochs", "seed", "lr", "warmup", "train_per_class",
                                                                 "train_from") if getattr(args, k) is not None})
        return train_and_save_hit(args.init, pathlib.Path(args.cache), args.scale, args.workers, hit_config, out,
                                  device)
    for config in (multi_config, twin_config):  # the card names what ran, not "auto"
        config["precision"] = resolve_precision(config["precision"], device)

    # each model is scored after every epoch on its validation set: seen types (multi), held-back types (twin)
    save_multi = functools.partial(train_and_save_multi, init=args.init)
    for name, config, train_and_save, validation_set in (("multi", multi_config, save_multi, "test"),
                                                         ("twin", twin_config, train_and_save_twin, "unseen")):
        if args.only not in (None, name):
            continue
        start, grid = time.time(), spi_grid(config["grid_size"])
        sets = load_sets(pathlib.Path(args.cache), args.scale, args.workers, random_shapes=config["random_shapes"],
                         grid=grid, names=("train", "random", *EXTRA_SET_RECIPES),
                         train_per_class=config["train_per_class"], crowded_per_class=config["crowded_per_class"],
                         close_per_class=config["close_per_class"], compact_per_class=config["compact_per_class"],
                         train_from=config["train_from"])
        validation = load_sets(pathlib.Path(args.cache), args.scale, args.workers, validation=True, grid=grid,
                               names=(validation_set,))
        train_and_save(sets, validation, config, time.time() - start, out, device)


def random_patterns(sets: dict, random_shapes: int) -> dict:
    """The patterns of the first `random_shapes` procedural particles in sets["random"]."""
    index = np.array([random_shape_index(p) for p in sets["random"]["particle"]])
    if index.max() + 1 < random_shapes:
        raise ValueError(f"the random set holds {index.max() + 1} procedural particles, not {random_shapes}")
    return {k: v[index < random_shapes] for k, v in sets["random"].items()}


def training_data(sets: dict, random_shapes: int) -> dict:
    """The seen types' training patterns, joined by the crowded and close sets' (if loaded) and those of the
    first `random_shapes` procedural particles."""
    parts = [sets["train"]] + [sets[name] for name in EXTRA_SET_RECIPES if name in sets]
    parts += [random_patterns(sets, random_shapes)] if random_shapes else []
    return joined(*parts) if len(parts) > 1 else parts[0]


def train_and_save_multi(sets, validation, multi_config, data_seconds, out, device="cpu", init=None):
    t0, c0 = time.time(), time.process_time()
    data = training_data(sets, multi_config["random_shapes"])
    start, started_from = None, {}
    if init is not None:
        start, init_card = load_model(init)
        if init_card.get("name") != "spi_multi" or init_card.get("architecture", {}).get("width", 0) > multi_config["width"]:
            raise ValueError(f"--init {init} is not an spi_multi of width {multi_config['width']} or less")
        started_from = {"initialised_from": {k: init_card.get(k) for k in ("name", "version", "sha256")}}
    multi, history = train_multi(data, multi_config, multi_config["seed"], validation["test"], device, start)
    multi_seconds = {"wall_seconds": round(time.time() - t0), "cpu_seconds": round(time.process_time() - c0),
                     "data_seconds": round(data_seconds), "device": str(device), **started_from,
                     "history (validation: dataset.validation_sets)": history}
    save_model(multi, card("spi_multi", multi, multi_config, sets, multi_seconds, {
        "architecture": {"n_types": len(SEEN_TYPES), "n_counts": 4, "width": multi_config["width"],
                         "patterson": multi_config["patterson"]},
        "outputs": {"count_logits": "4 logits, index i = i+1 particles in the beam",
                    "type_logits": "logits over particle_types"},
        "particle_types": SEEN_TYPES,
        "count_prior_folded": {"training_count_frequencies": count_frequencies(data),
                               "how": "models.spi.fold_count_prior: count logits as for equally likely 1-4 particles"},
    }), out / "spi_multi.safetensors")
    logger.info("saved %s", out / "spi_multi.safetensors")


def train_and_save_hit(init, cache: pathlib.Path, scale: float, workers: int, config: dict, out, device="cpu"):
    """`--only hit`: the spi_multi `init` with a hit head (add_hit_head), its P(hit) bar chosen on the validation
    sets (hit_operating_point) at diffnet.predict's default views, saved with a card saying how."""
    from dials_diffnet.inference import DEFAULT_VIEWS
    from dials_diffnet.models.views import ViewAveraged
    from dials_diffnet.spi.evaluate import hit_probabilities

    t0, c0 = time.time(), time.process_time()
    model, init_card = load_model(init)
    if init_card.get("name") != "spi_multi":
        raise ValueError(f"--init {init} is not an spi_multi")
    grid = spi_grid(init_card["grid"]["size"])
    n = max(1, int(round(config["blanks"] * scale)))
    hits = load_sets(cache, scale, workers, grid=grid, names=("train",), train_per_class=config["train_per_class"],
                     train_from=config["train_from"])["train"]
    blanks = build(blank_specs("train", n), cache / f"grid{grid.size}" / f"blank_train_{n}.npz", workers, grid)
    validation = load_sets(cache, scale, workers, validation=True, grid=grid, names=("test",))["test"]
    n_val = max(1, int(round(config["validation_blanks"] * scale)))
    validation_blanks = build(blank_specs("validation", n_val, pool="train"),
                              cache / f"grid{grid.size}" / f"validation_blank_{n_val}.npz", workers, grid)
    data_seconds = time.time() - t0
    net, history = add_hit_head(model, init_card, hits, blanks, config, device)
    views = DEFAULT_VIEWS["spi"]
    p_hit = [hit_probabilities(ViewAveraged(net, views), d["x"]) for d in (validation, validation_blanks)]
    point = hit_operating_point(p_hit[0], validation["noise"], p_hit[1])
    logger.info("hit head: min_p_hit %s (rule met: %s); %s", point["min_p_hit"], point["met"], point["candidates"])
    # the evaluation block stays: the count and type outputs it quotes are unchanged
    card = {k: v for k, v in init_card.items() if k not in ("sha256", "bytes")}
    card["architecture"] = dict(init_card["architecture"], hit_head=True)
    card["parameters"] = sum(p.numel() for p in net.parameters())
    card["outputs"] = dict(init_card["outputs"], hit_logits="logit of a particle in the beam (1) against a blank (0)")
    card["hit_head"] = {
        "initialised_from": {k: init_card.get(k) for k in ("name", "version", "sha256")},
        "frozen": "trunk, count and type heads (their outputs are those of initialised_from)",
        "config": config, "device": str(device), "history": history,
        "wall_seconds": round(time.time() - t0), "cpu_seconds": round(time.process_time() - c0),
        "data_seconds": round(data_seconds), "threads": torch.get_num_threads(),
        "hits": {"patterns": int(len(hits["seed"])), "seeds": [int(hits["seed"].min()), int(hits["seed"].max())],
                 "recipe": "spi.train's training shots per class train_from..train_per_class (clean and noisy)"},
        "blanks": {"patterns": n, "seeds": [int(blanks["seed"].min()), int(blanks["seed"].max())],
                   "recipe": "dataset.blank_specs: no particle, readout noise only (sigma drawn per frame from "
                             f"{sim.BLANK_READOUT_RANGE} photon), training pool"},
    }
    card["operating_point"] = {
        "min_p_hit": point["min_p_hit"], "views": views, "met": point["met"],
        "rule": "the largest of %s keeping >= 99 %% of the noisy validation hits and <= 1 %% of the validation "
                "blanks, else 0.5" % (HIT_OPERATING_POINTS,),
        "sets": {"hits": "dataset.validation_sets test (seen types, training pool, seeds 5,000,000+)",
                 "blanks": f"dataset.blank_specs('validation', {n_val}, pool='train')"},
        "candidates": point["candidates"],
    }
    save_model(net, card, out / "spi_multi.safetensors")
    logger.info("saved %s", out / "spi_multi.safetensors")


def train_and_save_twin(sets, validation, twin_config, data_seconds, out, device="cpu"):
    t0, c0 = time.time(), time.process_time()
    data = training_data(sets, twin_config["random_shapes"])
    twin, history = train_twin(data, twin_config, twin_config["seed"], validation=validation["unseen"], device=device)
    twin_seconds = {"wall_seconds": round(time.time() - t0), "cpu_seconds": round(time.process_time() - c0),
                    "data_seconds": round(data_seconds), "device": str(device),
                    "history (validation: dataset.validation_sets, held-back types)": history}
    save_model(twin, card("spi_twin", twin, twin_config, sets, twin_seconds, {
        "architecture": {"embedding_size": twin_config["embedding_size"], "width": twin_config["width"],
                         "patterson": twin_config["patterson"]},
        "outputs": {"embedding": "L2-normalised vector; few-shot classes by nearest prototype"},
        "triplet_classes": "particle count 1-4 (across the seen particle types)",
    }), out / "spi_twin.safetensors")
    logger.info("saved %s", out / "spi_twin.safetensors")


if __name__ == "__main__":
    main()
