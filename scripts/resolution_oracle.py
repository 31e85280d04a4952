"""How well can an image determine its resolution label at all? An upper-bound probe for issue 4.

The label (simulate/stills.py) comes from every recorded reflection's *expected* I/sigma, including the
many an image does not show. This probe regenerates the reflection lists of shard sets' stills from
their seeds and gives a regressor more than any image gives: the exact |q| and expected I/sigma of every
reflection with expected I/sigma >= T. It learns log(1/d) on one set (gradient-boosted trees on
per-shell counts and strengths, quantiles and the outermost reflections) and is scored on others the
way `diffnet.evaluate` scores a model: r(1/d) and median |dd|/d over the hits that are not
edge-limited. With `--model`, the CNN is scored on the same stills.

    python scripts/resolution_oracle.py --train /tmp/s27/train_s17 --n-train 4096 \\
        --test /tmp/s27/train_s16 /tmp/s27/val_s18 --thresholds 3 2 1 0.5 --model crystal.safetensors
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

SHELLS = np.linspace(0.0, 0.8, 33)  # |q| shells up to the crystal grid's reach (1/Angstrom)
QUANTILES = (1.0, 0.99, 0.95, 0.9, 0.75, 0.5, 0.25)
OUTERMOST = 32


def _reflections(job):
    directory, start, stop = job
    from dials_diffnet import datasets
    from dials_diffnet.simulate.dataset import iter_shots
    from dials_diffnet.simulate.stills import Recipe

    index = datasets.read_index(directory)
    recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in index["recipe"].items()})
    return [dict(s=image.reflections["s"].astype(np.float32), ios=image.reflections["ios"].astype(np.float32),
                 s_edge=float(image.frame.s.max()), wavelength=shot.wavelength, s_min=image.labels["s_min"],
                 scored=image.labels["is_hit"] and not image.labels["edge_limited"])
            for _, shot, image in iter_shots(index["seed"], range(start, stop), recipe, noise=False)]


def reflections(directory, n, nproc, chunk=64):
    """Per-still reflection lists of the first n stills of a shard set (noise-free renders; the labels do not
    depend on noise)."""
    from dials_diffnet import datasets

    n = min(n, datasets.read_index(directory)["n_images"])
    jobs = [(directory, a, min(a + chunk, n)) for a in range(0, n, chunk)]
    with ProcessPoolExecutor(nproc) as pool:
        return [row for rows in pool.map(_reflections, jobs) for row in rows]


def features(row, threshold):
    shown = row["ios"] >= threshold
    s, ios = row["s"][shown], row["ios"][shown]
    counts = np.histogram(s, SHELLS)[0]
    strength = np.histogram(s, SHELLS, weights=np.log(ios))[0] / np.maximum(counts, 1)
    order = np.argsort(s)[::-1][:OUTERMOST]
    outer_s, outer_ios = np.zeros(OUTERMOST), np.zeros(OUTERMOST)
    outer_s[: len(order)], outer_ios[: len(order)] = s[order], np.log(ios[order])
    quantiles = np.quantile(s, QUANTILES) if len(s) else np.zeros(len(QUANTILES))
    return np.concatenate([[np.log1p(len(s)), row["s_edge"], row["wavelength"]], quantiles,
                           np.log1p(counts), strength, outer_s, outer_ios])


def design(rows, threshold):
    rows = [r for r in rows if r["scored"]]
    return np.array([features(r, threshold) for r in rows]), np.array([r["s_min"] for r in rows])


def summary(resolution: dict) -> dict:
    """The figures this probe reports, from an `evaluate.resolution_metrics` dict."""
    return {"n": resolution["n"], "r_inv_d": resolution["pearson_r_inv_d"], "median_rel_d": resolution["median_rel_err_d"]}


def agreement(s_pred, s_true) -> dict:
    from dials_diffnet.evaluate import resolution_metrics

    return summary(resolution_metrics(s_pred, s_true))


def cnn_on(directory, model_path, views):
    """The CNN's scores on the same stills (the shards' images), as `diffnet.evaluate` computes them."""
    import torch

    from dials_diffnet import datasets
    from dials_diffnet.evaluate import evaluate_crystal
    from dials_diffnet.models.views import ViewAveraged
    from dials_diffnet.weights import load_model

    model, card = load_model(model_path)
    data = datasets.ShardDataset(directory, planes=card["architecture"]["in_channels"])
    metrics, _ = evaluate_crystal(ViewAveraged(model, views), data, torch.device("cpu"))
    return summary(metrics["resolution"])  # over the hits that are not edge-limited, as `design` scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="shard set whose stills the regressor learns from")
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--test", nargs="+", required=True, help="shard sets to score on (all their stills)")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[3.0])
    parser.add_argument("--model", help="also score this crystal model on the test sets' shard images")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from sklearn.ensemble import HistGradientBoostingRegressor

    train = reflections(args.train, args.n_train, args.nproc)
    tests = {d: reflections(d, 10**9, args.nproc) for d in args.test}
    result = {"train": args.train, "n_train_stills": len(train), "oracle": {}, "cnn": {}}
    for threshold in args.thresholds:
        X, y = design(train, threshold)
        regressor = HistGradientBoostingRegressor(max_iter=600, learning_rate=0.05, l2_regularization=1.0,
                                                  random_state=0).fit(X, np.log(y))
        for directory, rows in tests.items():
            Xt, yt = design(rows, threshold)
            score = agreement(np.exp(regressor.predict(Xt)), yt)
            result["oracle"].setdefault(directory, {})[f"{threshold:g}"] = score
            print(f"I/sigma >= {threshold:g} shown exactly, {directory}: n {score['n']}, "
                  f"r(1/d) {score['r_inv_d']:.4f}, median |dd|/d {score['median_rel_d']:.4f}", flush=True)
    if args.model:
        for directory in args.test:
            score = result["cnn"][directory] = cnn_on(directory, args.model, args.views)
            print(f"CNN ({args.views} views), {directory}: n {score['n']}, r(1/d) {score['r_inv_d']:.4f}, "
                  f"median |dd|/d {score['median_rel_d']:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
