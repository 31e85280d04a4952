"""Evaluate the SPI models with the poster's protocol; prints tables and writes JSON.

    python -m dials_diffnet.spi.evaluate [--weights DIR] [--cache DIR] [--json FILE] [--sweep] [--update-cards]
                                         [--validation]

--validation scores the validation sets instead (dataset.validation_sets: own seeds,
training geometries, seen and held-back types): where candidate models are compared.

1. Multi-output CNN on held-out test sets (seen particle types, unseen seeds and
   unseen detector geometries), clean and noisy: test accuracy (count and type both
   right), count accuracy, particle accuracy.
2. Twin network on particle types never seen in training: for each type, 5 support
   patterns per class drawn from that type's own shots, the rest are queries,
   nearest-prototype classification, averaged over random support draws. Reported:
   single-vs-multi accuracy with 4 count classes as support (a query is "single" when
   its nearest prototype is the 1-particle one), and with two support classes
   (5 singles, 5 multiples of mixed counts).
3. Optional sweep of embedding size x margin, reduced to fit a CPU: on the shipped twin's
   frozen trunk, a fresh projection head per (size, margin), scored as in 2.
4. CPU inference rate: model only, and representation + model from a detector frame.
5. With a hit head (spi_multi 0.14.0 on): hit vs blank at the card's bar and default views, on the
   test set's hits and as many noisy blank frames (test geometry pool, dataset.blank_specs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time

import numpy as np
import torch

from dials_diffnet.inference import DEFAULT_VIEWS
from dials_diffnet.models.views import ViewAveraged
from dials_diffnet.representation import GridSpec
from dials_diffnet.spi.fewshot import FewShotClassifier
from dials_diffnet.spi.dataset import blank_specs, build, row_spec, smallest_projected_separation
from dials_diffnet.spi.particles import UNSEEN_TYPES
from dials_diffnet.spi.simulate import NOMINAL_FLUENCE, represent_shot, shot_params, simulate
from dials_diffnet.spi.train import TWIN, load_sets, train_twin, training_data
from dials_diffnet.weights import load_model, save_model

logger = logging.getLogger("dials.diffnet.spi.evaluate")

N_SUPPORT = 5
TRIALS = 20
SWEEP_SIZES = (2, 4, 8, 16, 32)
SWEEP_MARGINS = (0.1, 0.3, 0.5, 1.0)


@torch.no_grad()
def run_model(model, x: np.ndarray, batch: int = 128):
    outs = [model(torch.from_numpy(x[i : i + batch]).float()) for i in range(0, len(x), batch)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]).numpy() for k in outs[0]}
    return torch.cat(outs).numpy()


def multi_metrics(model, card, data, rows) -> dict:
    out = run_model(model, data["x"][rows])
    count = out["count_logits"].argmax(1) + 1
    logits = out["count_logits"] - out["count_logits"].max(1, keepdims=True)
    p_call = 1.0 / np.exp(logits).sum(1)  # softmax probability of the called count (its logit is the max, 0)
    ptype = np.array(card["particle_types"])[out["type_logits"].argmax(1)]
    count_ok = count == data["count"][rows]
    type_ok = ptype == data["particle"][rows]
    separation = np.array([smallest_projected_separation(row_spec(data, r)) for r in rows])
    return {
        "n": int(len(rows)),
        "test_accuracy": float(np.mean(count_ok & type_ok)),
        "count_accuracy": float(np.mean(count_ok)),
        "particle_accuracy": float(np.mean(type_ok)),
        "single_vs_multi_accuracy": float(np.mean((count == 1) == (data["count"][rows] == 1))),
        "count_accuracy_by_count": {int(c): float(np.mean(count_ok[data["count"][rows] == c])) for c in range(1, 5)},
        "count_accuracy_by_type": {
            str(t): float(np.mean(count_ok[data["particle"][rows] == t])) for t in np.unique(data["particle"][rows])
        },
        "count_accuracy_by_projected_separation": accuracy_by_separation(separation, count_ok),
        "count_errors": count_errors(data, rows, count, p_call, separation),
    }


def hit_probabilities(model, x: np.ndarray) -> np.ndarray:
    """P(hit) of every pattern from a model with a hit head."""
    return 1 / (1 + np.exp(-run_model(model, x)["hit_logits"]))


def hit_metrics(model, bar: float, hits: dict, blanks: dict) -> dict:
    """Hit vs blank at P(hit) >= bar: the share of hits kept (by noise, and by particle type for noisy
    hits), of blank frames kept, and the accuracy over both."""
    p_hit = [hit_probabilities(model, d["x"]) for d in (hits, blanks)]
    kept, blank_kept = p_hit[0] >= bar, p_hit[1] >= bar
    noisy = hits["noise"] == "noisy"
    return {
        "min_p_hit": bar, "hits": int(len(kept)), "blanks": int(len(blank_kept)),
        "hits_kept": {noise: float(np.mean(kept[hits["noise"] == noise])) for noise in ("clean", "noisy")},
        "noisy_hits_kept_by_type": {str(t): float(np.mean(kept[noisy & (hits["particle"] == t)]))
                                    for t in np.unique(hits["particle"])},
        "blanks_kept": float(np.mean(blank_kept)),
        "noisy_hit_vs_blank_accuracy": float(np.mean(np.concatenate([kept[noisy], ~blank_kept]))),
        "lowest_p_hit_of_a_hit": float(p_hit[0].min()), "highest_p_hit_of_a_blank": float(p_hit[1].max()),
    }


def count_errors(data: dict, rows, count, p_call, separation) -> list:
    """Every miscounted shot with what it takes to look at it again: its spec (seed, type, noise; the shot is
    regenerated by simulate.shot_params), the call and its probability, the closest pair in projection
    (`separation`, per row), and the draws that differ from shot to shot (geometry, fluence)."""
    errors = []
    for i in np.flatnonzero(count != data["count"][rows]):
        spec = row_spec(data, rows[i])
        params = shot_params(spec.seed, spec.particle, spec.count, spec.noise, spec.pool)
        errors.append({"seed": spec.seed, "particle": spec.particle, "noise": spec.noise, "count": spec.count,
                       "called": int(count[i]), "p_called": round(float(p_call[i]), 3),
                       # None for one particle: JSON has no infinity
                       "closest_pair_diameters": round(float(separation[i]), 2) if np.isfinite(separation[i]) else None,
                       "energy_kev": params.energy_kev, "distance_mm": params.distance_mm,
                       "fluence_factor": round(params.fluence / NOMINAL_FLUENCE, 2)})
    return errors


SEPARATION_BINS = ((0.0, 0.5), (0.5, 1.0), (1.0, np.inf))


def accuracy_by_separation(separation, count_ok) -> dict:
    """Count accuracy of multiple hits by how far apart their closest pair is in projection (`separation`,
    in diameters, inf for single hits, which no bin holds)."""
    out = {}
    for lo, hi in SEPARATION_BINS:
        sel = (separation >= lo) & (separation < hi)
        out[f"{lo:g}-{hi:g} diameters"] = {"n": int(sel.sum()),
                                           "count_accuracy": float(np.mean(count_ok[sel])) if sel.any() else None}
    return out


def fewshot_scores(embeddings, counts, types, n_support=N_SUPPORT, trials=TRIALS, seed=0) -> dict:
    """Few-shot single-vs-multi accuracy per particle type, support drawn from that type only."""
    rng = np.random.default_rng(seed)
    per_type = {}
    for t in np.unique(types):
        rows = np.flatnonzero(types == t)
        four, two, four_count = [], [], []
        for _ in range(trials):
            support = np.concatenate(
                [rng.choice(rows[counts[rows] == c], n_support, replace=False) for c in range(1, 5)]
            )
            query = np.setdiff1d(rows, support)
            truth_single = counts[query] == 1
            clf = FewShotClassifier(embeddings[support], counts[support])
            pred, _ = clf.predict(embeddings[query])
            pred = np.array(pred)
            four.append(np.mean((pred == 1) == truth_single))
            four_count.append(np.mean(pred == counts[query]))
            singles = rng.choice(rows[counts[rows] == 1], n_support, replace=False)
            multis = rng.choice(rows[counts[rows] > 1], n_support, replace=False)
            support2 = np.concatenate([singles, multis])
            query2 = np.setdiff1d(rows, support2)
            clf2 = FewShotClassifier(embeddings[support2], np.where(counts[support2] == 1, "single", "multi"))
            pred2, _ = clf2.predict(embeddings[query2])
            two.append(np.mean((np.array(pred2) == "single") == (counts[query2] == 1)))
        per_type[str(t)] = {
            "single_vs_multi_4class_support": float(np.mean(four)),
            "count_accuracy_4class_support": float(np.mean(four_count)),
            "single_vs_multi_2class_support": float(np.mean(two)),
        }
    keys = next(iter(per_type.values())).keys()
    return {"mean": {k: float(np.mean([v[k] for v in per_type.values()])) for k in keys}, "per_type": per_type}


def twin_metrics(model, unseen: dict, views: int = 1) -> dict:
    """Few-shot scores per noise level; `model` embeds grids (views > 1: averaged over views) or, as the
    sweep's heads, trunk features (views = 1)."""
    emb = run_model(model if views == 1 else (lambda x: model.embed(x, views)), unseen["x"])
    return {
        noise: fewshot_scores(emb[unseen["noise"] == noise], unseen["count"][unseen["noise"] == noise],
                              unseen["particle"][unseen["noise"] == noise])
        for noise in ("clean", "noisy")
    }


class UnitHead(torch.nn.Module):
    """A fresh projection head onto the unit sphere, for the sweep on frozen trunk features."""

    def __init__(self, n_features, embedding_size):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(n_features, 128), torch.nn.ReLU(), torch.nn.Linear(128, embedding_size)
        )

    def forward(self, f):
        return torch.nn.functional.normalize(self.layers(f), dim=1)


def sweep(twin, train: dict, unseen: dict, epochs: int, sizes=SWEEP_SIZES, margins=SWEEP_MARGINS):
    """Embedding size x margin, reduced: the shipped twin's trunk is frozen and its features computed
    once; for every (E, alpha) a fresh projection head is trained with the same triplet loss and
    mining on all training patterns, then scored on the unseen types as above. Retraining the
    whole network 20 times does not fit a 2-core CPU budget."""
    features = {name: {**d, "x": run_model(twin.trunk, d["x"])} for name, d in (("train", train), ("unseen", unseen))}
    results = []
    for size in sizes:
        for margin in margins:
            start = time.time()
            head = UnitHead(twin.trunk.n_features, size)
            train_twin(features["train"], dict(TWIN, embedding_size=size, margin=margin, epochs=epochs), model=head)
            scores = twin_metrics(head, features["unseen"])
            row = {"embedding_size": size, "margin": margin, "seconds": round(time.time() - start),
                   **{f"{noise}_single_vs_multi": scores[noise]["mean"]["single_vs_multi_4class_support"]
                      for noise in scores}}
            logger.info("sweep %s", row)
            results.append(row)
    return {"method": "frozen shipped trunk, fresh head per cell", "train_patterns": int(len(train["x"])),
            "epochs": epochs, "rows": results}


def inference_rate(model, grid_size: int, batch: int = 64, repeats: int = 3) -> float:
    """Images per second through the model alone on its grid (batch `batch`, current torch threads)."""
    x = torch.randn(batch, 2, grid_size, grid_size)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return batch * repeats / (time.perf_counter() - start)


def representation_rate(n: int = 20) -> float:
    """Detector frames per second through `represent` alone (grid map cached, as for a run of one geometry)."""
    shot = simulate(shot_params(0, "capsid", 2, "noisy", "test"))
    represent_shot(shot)
    start = time.perf_counter()
    for _ in range(n):
        represent_shot(shot)
    return n / (time.perf_counter() - start)


def print_tables(results: dict):
    print(f"\nMulti-output CNN, seen particle types ({results['protocol']['sets']})")
    print(f"{'test set':<14} {'n':>5} {'test acc':>9} {'count acc':>10} {'particle acc':>13} {'single/multi':>13}")
    views = results["protocol"]["default_views"]
    for key, how in (("multi", ""), ("multi_default_views", f", {views} views")):
        for noise, m in results[key].items():
            print(f"{noise + how:<14} {m['n']:>5} {100 * m['test_accuracy']:>9.1f} {100 * m['count_accuracy']:>10.1f} "
                  f"{100 * m['particle_accuracy']:>13.1f} {100 * m['single_vs_multi_accuracy']:>13.1f}")
    print("count accuracy of multiple hits by the closest pair's separation in projection (particle diameters):")
    for noise, m in results["multi"].items():
        print(f"{noise:<8} " + "  ".join(f"{k}: {100 * v['count_accuracy']:.1f} (n={v['n']})"
                                        for k, v in m["count_accuracy_by_projected_separation"].items() if v["n"]))
    print(f"miscounted shots at {views} views (seed, type, true -> called count, its probability, closest pair in "
          "projection in diameters, keV, mm, fluence / nominal):")
    for noise, m in results["multi_default_views"].items():
        for e in m["count_errors"]:
            pair = "-" if e["closest_pair_diameters"] is None else e["closest_pair_diameters"]
            print(f"{noise:<8} {e['seed']} {e['particle']:<9} {e['count']} -> {e['called']} p {e['p_called']:.2f} "
                  f"pair {pair} {e['energy_kev']} keV {e['distance_mm']:g} mm x{e['fluence_factor']:.2f}")
    if "hit" in results:
        h = results["hit"]
        print(f"\nHit vs blank at P(hit) >= {h['min_p_hit']:g} ({views} views): {h['hits']} hits, {h['blanks']} noisy blank "
              f"frames; hits kept clean {100 * h['hits_kept']['clean']:.1f} %, noisy {100 * h['hits_kept']['noisy']:.1f} %; "
              f"blanks kept {100 * h['blanks_kept']:.1f} %; noisy hits vs blanks {100 * h['noisy_hit_vs_blank_accuracy']:.1f} %")
        print("noisy hits kept by type: " + ", ".join(f"{t} {100 * v:.1f}" for t, v in h["noisy_hits_kept_by_type"].items()))
    for key, how in (("twin_unseen", ""), ("twin_unseen_default_views", f", embeddings averaged over {views} views")):
        print(f"\nTwin network, unseen particle types, {N_SUPPORT} support patterns per class, {TRIALS} draws{how}")
        print(f"{'test set':<8} {'type':<10} {'1-vs-multi (4 cls)':>19} {'count acc (4 cls)':>18} {'1-vs-multi (2 cls)':>19}")
        for noise, m in results[key].items():
            for t, v in list(m["per_type"].items()) + [("mean", m["mean"])]:
                print(f"{noise:<8} {t:<10} {100 * v['single_vs_multi_4class_support']:>19.1f} "
                      f"{100 * v['count_accuracy_4class_support']:>18.1f} {100 * v['single_vs_multi_2class_support']:>19.1f}")
    if "sweep" in results:
        s = results["sweep"]
        print(f"\nTwin sweep ({s['method']}: {s['train_patterns']} patterns, {s['epochs']} epochs), "
              "unseen single-vs-multi accuracy % clean / noisy")
        print("E \\ alpha " + "".join(f"{m:>14}" for m in SWEEP_MARGINS))
        for size in SWEEP_SIZES:
            rows = {r["margin"]: r for r in s["rows"] if r["embedding_size"] == size}
            print(f"{size:<10}" + "".join(
                f"{100 * rows[m]['clean_single_vs_multi']:>7.1f}/{100 * rows[m]['noisy_single_vs_multi']:<6.1f}"
                if m in rows else f"{'':>14}" for m in SWEEP_MARGINS))
    r = results["rates"]
    print(f"\nCPU inference ({r['threads']} thread(s)): multi {r['multi_model_images_per_s']:.0f} images/s, "
          f"twin {r['twin_model_images_per_s']:.0f} images/s (model only); represent() "
          f"{r['represent_frames_per_s']:.0f} frames/s; represent + multi {r['multi_with_representation_images_per_s']:.0f} images/s")


def card_figures(per_noise: dict) -> dict:
    """multi_metrics per noise level as a model card quotes them: the list of miscounted shots stays in the JSON."""
    return {noise: {k: v for k, v in m.items() if k != "count_errors"} for noise, m in per_noise.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(pathlib.Path(__file__).resolve().parents[1] / "weights"))
    parser.add_argument("--cache", default="/tmp/diffnet_spi_data")
    parser.add_argument("--json", default="spi_evaluation.json")
    parser.add_argument("--sweep", action="store_true", help="retrain twin networks for the size x margin sweep")
    parser.add_argument("--sweep-epochs", type=int, default=20)
    parser.add_argument("--update-cards", action="store_true", help="write the figures into the model cards")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--validation", action="store_true",
                        help="score on the validation sets (to choose between candidate models) instead of test/unseen")
    args = parser.parse_args(argv)
    if args.validation and args.update_cards:
        parser.error("model cards quote test-set figures: --update-cards cannot go with --validation")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    weights = pathlib.Path(args.weights)

    multi, multi_card = load_model(weights / "spi_multi.safetensors")
    twin, twin_card = load_model(weights / "spi_twin.safetensors")
    # rates first, before gigabytes of data sets and the sweep: measured after them, the same calls ran ~1/3 slower
    multi_rate = inference_rate(multi, multi_card["grid"]["size"])
    twin_rate, rep_rate = inference_rate(twin, twin_card["grid"]["size"]), representation_rate()
    rates = {
        "threads": torch.get_num_threads(),
        "multi_model_images_per_s": multi_rate,
        "twin_model_images_per_s": twin_rate,
        "represent_frames_per_s": rep_rate,
        "multi_with_representation_images_per_s": 1.0 / (1.0 / multi_rate + 1.0 / rep_rate),
    }

    def sets_on(card, names, random_shapes=0):
        """The sets in `names`, on the grid the model of `card` reads (validation sets with --validation)."""
        kwargs = dict(workers=args.workers, grid=GridSpec(**card["grid"]), names=names)
        sets = load_sets(pathlib.Path(args.cache), random_shapes=random_shapes, **kwargs)
        return {**sets, **load_sets(pathlib.Path(args.cache), validation=True, **kwargs)} if args.validation else sets

    test = sets_on(multi_card, ("test",))["test"]
    views = DEFAULT_VIEWS["spi"]
    # the sweep's heads train on what the twin trained on
    twin_random_shapes = twin_card["training"].get("random_shapes", 0) if args.sweep else 0
    sets = sets_on(twin_card, ("test", "unseen") + (("train", "random") if args.sweep else ()), twin_random_shapes)
    results = {
        "multi": {noise: multi_metrics(multi, multi_card, test, np.flatnonzero(test["noise"] == noise))
                  for noise in ("clean", "noisy")},
        # what diffnet.predict task=spi reports by default (views=Auto)
        "multi_default_views": {noise: multi_metrics(ViewAveraged(multi, views), multi_card, test,
                                                     np.flatnonzero(test["noise"] == noise))
                                for noise in ("clean", "noisy")},
        "twin_unseen": twin_metrics(twin, sets["unseen"]),
        "twin_unseen_default_views": twin_metrics(twin, sets["unseen"], views=views),
        "twin_seen_test": twin_metrics(twin, sets["test"]),
        "unseen_types": UNSEEN_TYPES,
        "protocol": {"sets": "validation sets: training geometries, seeds 5,000,000+" if args.validation
                     else "test sets: held-out seeds and detector geometries",
                     "n_support_per_class": N_SUPPORT, "trials": TRIALS, "default_views": views,
                     "noisy": multi_card["training"]["data"]["noisy"]},
    }
    if "operating_point" in multi_card:
        blanks = blank_specs("validation" if args.validation else "test", len(test["seed"]) // 2,
                             pool="train" if args.validation else "test")
        cache = pathlib.Path(args.cache) / f"grid{multi_card['grid']['size']}" / \
            f"{'validation' if args.validation else 'test'}_blank_{len(blanks)}.npz"
        results["hit"] = hit_metrics(ViewAveraged(multi, views), multi_card["operating_point"]["min_p_hit"], test,
                                     build(blanks, cache, args.workers))
    if args.sweep:
        results["sweep"] = sweep(twin, training_data(sets, twin_random_shapes), sets["unseen"], args.sweep_epochs)
    results["rates"] = rates
    print_tables(results)
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", args.json)
    if args.update_cards:
        for name, model, card in (("spi_multi", multi, multi_card), ("spi_twin", twin, twin_card)):
            keep = {k: v for k, v in card.items() if k not in ("sha256", "bytes")}
            keep["evaluation"] = {
                "spi_multi": {**{key: card_figures(results[key]) for key in ("multi", "multi_default_views")},
                              **({"hit_vs_blank": results["hit"]} if "hit" in results else {}),
                              "protocol": results["protocol"], "rates": results["rates"]},
                "spi_twin": {"twin_unseen": results["twin_unseen"],
                             "twin_unseen_default_views": results["twin_unseen_default_views"],
                             "protocol": results["protocol"],
                             # a run without --sweep keeps the sweep the card already quotes
                             "sweep": results.get("sweep", card.get("evaluation", {}).get("sweep")),
                             "rates": results["rates"]},
            }[name]
            save_model(model, keep, weights / f"{name}.safetensors")


if __name__ == "__main__":
    main()
