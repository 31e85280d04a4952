"""Triplet loss and mining, few-shot prototypes, and the shipped SPI weights on fresh simulated shots."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from dials_diffnet.models import ARCHITECTURES, build
from dials_diffnet.spi import SPI_GRID
from dials_diffnet.spi import simulate as sim
from dials_diffnet.spi.dataset import SEED_BASES
from dials_diffnet.spi.fewshot import FewShotClassifier
from dials_diffnet.spi.triplet import batch_triplet_loss, mine_triplets, pairwise_distances, triplet_loss

torch.set_num_threads(1)


def test_triplet_loss_values():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6]])  # d_p = sqrt(0.4)
    n = torch.tensor([[0.0, 1.0]])  # d_n = sqrt(2)
    d_p, d_n = math.sqrt(0.4), math.sqrt(2.0)
    assert triplet_loss(a, p, n, 0.3).item() == pytest.approx(0.0)
    assert triplet_loss(a, p, n, 1.0).item() == pytest.approx(d_p - d_n + 1.0, abs=1e-6)
    assert triplet_loss(a, n, p, 0.1).item() == pytest.approx(d_n - d_p + 0.1, abs=1e-6)  # swapped: a violation
    both = triplet_loss(torch.cat([a, a]), torch.cat([p, n]), torch.cat([n, p]), 0.1).item()
    assert both == pytest.approx((d_n - d_p + 0.1) / 2, abs=1e-6)


def points(*xs):
    return torch.tensor([[x, 0.0] for x in xs])


def test_semihard_mining_picks_closest_negative_beyond_the_positive():
    # anchor 0 at 0, positive 1 at 1; negatives at distances 0.5 (hard), 1.2 (semi-hard), 3 (easy)
    emb = points(0.0, 1.0, -0.5, -1.2, 3.0)
    labels = torch.tensor([0, 0, 1, 1, 1])
    a, p, n = mine_triplets(pairwise_distances(emb), labels, margin=0.5)
    chosen = {(int(i), int(j)): int(k) for i, j, k in zip(a, p, n)}
    assert chosen[(0, 1)] == 3  # not the hard one at 0.5, not the easy one at 3
    assert chosen[(1, 0)] == 2  # from x=1: negatives at 1.5, 2.2, 2.0 -> closest beyond d_p = 1
    # negative anchors: (2, 3) d_p = 0.7, label-0 points at 0.5 and 1.5 -> 1.5 (index 1)
    assert chosen[(2, 3)] == 1
    # when every negative is closer than the positive, the farthest (least hard) negative is used
    emb = points(0.0, 5.0, 1.0, 2.0)
    a, p, n = mine_triplets(pairwise_distances(emb), torch.tensor([0, 0, 1, 1]), margin=0.5)
    assert {(int(i), int(j)): int(k) for i, j, k in zip(a, p, n)}[(0, 1)] == 3


def test_hard_mining_and_batch_loss_gradient():
    emb = points(0.0, 1.0, -0.5, -1.2, 3.0)
    labels = torch.tensor([0, 0, 1, 1, 1])
    a, p, n = mine_triplets(pairwise_distances(emb), labels, margin=0.5, strategy="hard")
    assert int(p[a == 0]) == 1 and int(n[a == 0]) == 2  # farthest positive, closest negative
    assert int(p[a == 4]) == 3 and int(n[a == 4]) == 1
    emb = emb.clone().requires_grad_(True)
    loss = batch_triplet_loss(emb, labels, margin=0.5)
    loss.backward()
    assert loss.item() > 0 and emb.grad.abs().sum() > 0
    single_class = batch_triplet_loss(emb, torch.zeros(5, dtype=torch.long), 0.5)
    assert single_class.item() == 0.0


def test_fewshot_prototypes_classify_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.standard_normal((16, 3)))[0].T  # 3 orthonormal directions in 16-D
    def sample(c, n):
        x = centres[c] + 0.15 * rng.standard_normal((n, 16))
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    support = np.concatenate([sample(c, 5) for c in range(3)])
    labels = np.repeat(["single", "double", "triple"], 5)
    queries = np.concatenate([sample(c, 50) for c in range(3)])
    truth = np.repeat(["single", "double", "triple"], 50)
    for method in ("prototype", "nearest"):
        pred, dist = FewShotClassifier(support, labels, method).predict(queries)
        assert np.mean(np.array(pred) == truth) > 0.98 and np.all(dist < 1.0)
    with pytest.raises(ValueError):
        FewShotClassifier(np.zeros((0, 16)), [])


def test_spi_models_registered_and_shapes():
    assert {"SpiMultiNet", "SpiTwinNet"} <= set(ARCHITECTURES)
    x = torch.randn(3, 2, SPI_GRID.size, SPI_GRID.size)
    multi = build({"class": "SpiMultiNet", "n_types": 8, "width": 8}).eval()
    out = multi(x)
    assert out["count_logits"].shape == (3, 4) and out["type_logits"].shape == (3, 8)
    twin = build({"class": "SpiTwinNet", "embedding_size": 16, "width": 8}).eval()
    emb = twin(x)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=1), torch.ones(3))


# Shipped weights on shots simulated now, with seeds no data set used and the test geometry pool.
CHECK_TYPES = ("groel", "spike", "ribosome", "dumbbell", "vesicle")  # cheap to simulate


@pytest.fixture(scope="module")
def task():
    from dials_diffnet.spi.task import SpiTask

    return SpiTask()


def fresh_inputs(types, noise, per_count, seed0):
    seed, xs, counts = seed0, [], []
    for t in types:
        for count in range(1, 5):
            for _ in range(per_count):
                shot = sim.simulate(sim.shot_params(seed, t, count, noise, "test"))
                xs.append(sim.represent_shot(shot))
                counts.append(count)
                seed += 1
    return torch.from_numpy(np.stack(xs)), np.array(counts)


def test_shipped_multi_model_counts_fresh_shots(task):
    x, counts = fresh_inputs(CHECK_TYPES, "clean", 2, SEED_BASES["check"])
    records = task.predict_batch(x)
    predicted = np.array([r["spi_count"] for r in records])
    assert np.mean(predicted == counts) >= 0.6  # chance is 0.25
    assert np.mean((predicted == 1) == (counts == 1)) >= 0.9  # always-"multi" would score 0.75
    r = records[0]
    assert set(task.reflection_columns) <= set(r) and all(isinstance(r[c], float | int) for c in task.reflection_columns)
    assert r["spi_type"] in task.particle_types and len(r["spi_count_probs"]) == 4
    assert r["spi_p_single"] == pytest.approx(r["spi_count_probs"][0])
    assert task.name == "spi" and task.grid == SPI_GRID and set(task.models) == {"spi_multi", "spi_twin"}


def test_task_feeds_each_network_its_own_grid_and_refuses_one_that_does_not_nest(tmp_path):
    import json
    import shutil

    from dials.util import Sorry

    from dials_diffnet.models.grids import Coarsened
    from dials_diffnet.spi.task import SpiTask
    from dials_diffnet.weights import card_path, shipped_path

    task = SpiTask(views=1)
    sizes = {name: json.loads(card_path(shipped_path(name)).read_text())["grid"]["size"] for name in task.models}
    assert {name: m["grid_size"] for name, m in task.models.items()} == sizes
    assert max(sizes.values()) == SPI_GRID.size  # the task reads images on the finest grid a network needs
    for net, name in ((task.multi.model, "spi_multi"), (task.twin, "spi_twin")):
        assert isinstance(net, Coarsened) == (sizes[name] < SPI_GRID.size)
    for name in ("spi_twin.safetensors", "spi_twin.json"):
        shutil.copy(card_path(shipped_path("spi_twin")).parent / name, tmp_path / name)
    card = json.loads((tmp_path / "spi_twin.json").read_text())
    # a card naming a coarser grid that nests: its net gets the coarsened input (both shipped nets read 256 cells)
    (tmp_path / "spi_twin.json").write_text(json.dumps(dict(card, grid={"size": 64, "s_max": 0.012})))
    coarse = SpiTask(twin_path=tmp_path / "spi_twin.safetensors", views=1)
    assert isinstance(coarse.twin, Coarsened) and coarse.twin.factor == SPI_GRID.size // 64
    assert coarse.models["spi_twin"]["grid_size"] == 64
    (tmp_path / "spi_twin.json").write_text(json.dumps(dict(card, grid={"size": 96, "s_max": 0.012})))
    with pytest.raises(Sorry, match="does not nest"):
        SpiTask(twin_path=tmp_path / "spi_twin.safetensors")


def test_shipped_twin_fewshot_on_unseen_type_with_cxi_reference(tmp_path):
    from dials_diffnet.spi.cxi import write_cxi
    from dials_diffnet.spi.task import SpiTask

    seed = SEED_BASES["check"] + 1000
    support = [sim.simulate(sim.shot_params(seed + i, "ferritin", 1 + i % 4, "clean", "test")) for i in range(20)]
    write_cxi(tmp_path / "support.cxi", support)
    task = SpiTask(reference=tmp_path / "support.cxi")
    assert task.fewshot.classes == ["double", "quadruple", "single", "triple"]
    x, counts = fresh_inputs(("ferritin",), "clean", 8, seed + 100)
    records = task.predict_batch(x)
    single = np.array([r["spi_fewshot_label"] == "single" for r in records])
    assert np.mean(single == (counts == 1)) >= 0.85  # always-"multi" would score 0.75; evaluation: 98 %
    assert "spi_fewshot_distance" in task.reflection_columns and records[0]["spi_fewshot_distance"] >= 0


def test_pk_batches_hold_every_class_and_change_with_the_epoch():
    from dials_diffnet.spi.train import PKBatchSampler

    labels = np.repeat([1, 2, 3, 4], [10, 12, 9, 20])
    sampler = PKBatchSampler(labels, per_class=4, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 2  # the smallest class (9) fills two batches of 4
    for batch in first:
        assert sorted(np.bincount(labels[batch])[1:]) == [4, 4, 4, 4]
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_twin_training_in_the_shared_loop_separates_counts_on_validation():
    """train_twin runs in train.fit: the triplet loss falls and the held-out few-shot score is recorded."""
    from dials_diffnet.spi.evaluate import UnitHead
    from dials_diffnet.spi.train import TWIN, train_twin

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 2

    def features(per_count):
        count = np.repeat(np.arange(1, 5), per_count)
        x = centres[count - 1] + rng.normal(size=(len(count), 16))
        return {"x": x.astype(np.float32), "count": count, "particle": np.where(np.arange(len(count)) % 2, "a", "b")}

    torch.manual_seed(0)
    model, history = train_twin(features(48), dict(TWIN, epochs=6, per_class=8), model=UnitHead(16, 8),
                                validation=features(40))
    assert history[-1]["train_triplet"] < history[0]["train_triplet"]
    assert history[-1]["val_single_vs_multi"] > 0.95


def brightness_patterns(rng, per_count):
    """Patterns whose particle count is plain to see: their brightness."""
    from dials_diffnet.spi.particles import SEEN_TYPES

    count = np.repeat(np.arange(1, 5), per_count)
    x = np.ones((len(count), 2, SPI_GRID.size, SPI_GRID.size), np.float16)
    x[:, 0] = (0.7 * count[:, None, None] + rng.normal(0, 0.3, (len(count), SPI_GRID.size, SPI_GRID.size)))
    return {"x": x, "count": count, "particle": np.array([SEEN_TYPES[i % 2] for i in range(len(count))])}


def test_multi_training_in_the_shared_loop_learns_the_count():
    """train_multi runs in train.fit on patterns whose count is plain to see (brightness): it learns it."""
    from dials_diffnet.spi.train import MULTI, train_multi

    rng = np.random.default_rng(1)

    def patterns(per_count):
        return brightness_patterns(rng, per_count)

    model, history = train_multi(patterns(24), dict(MULTI, width=4, epochs=6, batch=16), validation=patterns(8))
    assert history[-1]["val_count_accuracy"] >= 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # a warm restart (spi.train --init) starts from the trained weights: at lr 0 they stay, and so does the count
    restarted, again = train_multi(patterns(24), dict(MULTI, width=4, epochs=1, batch=16, lr=0.0), validation=patterns(8),
                                   init=model)
    assert again[0]["val_count_accuracy"] >= 0.9
    for name, value in model.state_dict().items():
        if name.endswith("weight"):
            torch.testing.assert_close(restarted.state_dict()[name], value)


def test_bfloat16_steps_on_cpu_learn_and_hand_back_float32_weights_in_the_usual_layout(tmp_path):
    """precision=bfloat16 runs the forward pass under CPU autocast (2x a step on AVX-512 BF16); the weights,
    optimiser and loss stay float32, and the model leaves fit channels-first, so it saves and loads as ever."""
    from dials_diffnet.spi.train import MULTI, train_multi
    from dials_diffnet.train import resolve_precision
    from dials_diffnet.weights import load_model, save_model

    rng = np.random.default_rng(2)
    model, history = train_multi(brightness_patterns(rng, 24), dict(MULTI, width=4, epochs=6, batch=16, precision="bfloat16"),
                                 validation=brightness_patterns(rng, 8))
    assert history[-1]["val_count_accuracy"] >= 0.9 and history[-1]["train_loss"] < history[0]["train_loss"]
    for name, value in model.state_dict().items():
        assert value.dtype in (torch.float32, torch.int64) and value.is_contiguous(), name
    save_model(model, {"name": "spi_multi", "architecture": {"class": "SpiMultiNet", "n_types": 8, "n_counts": 4, "width": 4,
                                                             "patterson": MULTI["patterson"]}}, tmp_path / "m.safetensors")
    loaded, _ = load_model(tmp_path / "m.safetensors")
    x = torch.from_numpy(brightness_patterns(rng, 2)["x"]).float()
    torch.testing.assert_close(loaded(x)["count_logits"], model(x)["count_logits"])
    # auto keeps CPU training in float32 (how the shipped models were trained); CUDA steps run in bf16
    assert resolve_precision("auto", "cpu") == "float32" and resolve_precision("auto", "cuda") == "bfloat16"
    assert resolve_precision("float32", "cuda") == "float32" and resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="precision='half'"):
        resolve_precision("half", "cpu")


def test_unequal_training_counts_are_folded_out_of_the_count_logits_and_nothing_else():
    """A net trained on more 3- and 4-particle shots (the crowded set) learns to say 3 or 4 more often. Training
    ends by removing log(frequency / mean frequency) from each count's logit; equal counts change nothing."""
    from dials_diffnet.models.spi import SpiMultiNet, fold_count_prior
    from dials_diffnet.spi.particles import SEEN_TYPES
    from dials_diffnet.spi.train import MULTI, count_frequencies, train_multi

    torch.manual_seed(0)
    net = SpiMultiNet(width=4).eval()
    x = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        before = net(x)
        fold_count_prior(net, [50, 50, 50, 50])
        torch.testing.assert_close(net(x)["count_logits"], before["count_logits"])
        fold_count_prior(net, [1, 1, 4, 4])  # mean 2.5
        after = net(x)
    torch.testing.assert_close(after["count_logits"] - before["count_logits"],
                               torch.log(torch.tensor([2.5, 2.5, 0.625, 0.625])).expand(3, 4))
    torch.testing.assert_close(after["type_logits"], before["type_logits"])

    # train_multi does it with the frequencies of its own data: at lr 0 only the fold moves the count biases
    count = np.repeat(np.arange(1, 5), [2, 2, 6, 6])
    data = {"x": np.zeros((len(count), 2, 64, 64), np.float16), "count": count,
            "particle": np.array([SEEN_TYPES[0]] * len(count))}
    assert count_frequencies(data) == [2, 2, 6, 6]
    start = SpiMultiNet(n_types=len(SEEN_TYPES), width=4, patterson=MULTI["patterson"]).eval()
    trained, _ = train_multi(data, dict(MULTI, width=4, epochs=1, batch=4, lr=0.0), init=start)
    torch.testing.assert_close(trained.count_head[-1].bias - start.count_head[-1].bias,
                               -torch.log(torch.tensor([0.5, 0.5, 1.5, 1.5])))


def test_a_wider_spi_net_grown_from_a_narrow_one_starts_with_its_outputs_and_learns():
    """grow_spi: the trunk's [means, maxima] features are re-indexed, so both heads keep their answers."""
    from dials_diffnet.models.spi import SpiMultiNet, SpiTwinNet, grow_spi

    torch.manual_seed(3)
    x = torch.randn(3, 2, 64, 64)
    x[:, 1] = (torch.rand(3, 64, 64) > 0.1).float()
    for narrow, wide in ((SpiMultiNet(width=4, patterson="flat"), SpiMultiNet(width=6, patterson="flat")),
                         (SpiTwinNet(width=4, embedding_size=8), SpiTwinNet(width=6, embedding_size=8))):
        for m in narrow.modules():  # trained-looking batch-norm statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        grow_spi(wide, narrow)

        def outputs(net):  # the multi-output net's logits, or the twin's embedding
            out = net(x)
            return list(out.values()) if isinstance(out, dict) else [out]

        with torch.no_grad():
            for before, after in zip(outputs(narrow.eval()), outputs(wide.eval())):
                torch.testing.assert_close(after, before)
        sum(out[:, 0].sum() for out in outputs(wide.train())).backward()
        reader = wide.get_submodule(wide.FEATURE_READERS[0]).weight.grad
        n_old, n_new = narrow.trunk.n_features // 2, wide.trunk.n_features // 2
        new_means, new_maxima = reader[:, n_old:n_new], reader[:, n_new + n_old:]
        assert new_means.abs().sum() > 0 and new_maxima.abs().sum() > 0  # the new channels learn
    with pytest.raises(ValueError, match="width may only grow"):
        grow_spi(SpiMultiNet(width=4), SpiMultiNet(width=6))


def test_symmetrised_embedding_is_invariant_under_the_grid_symmetries():
    from dials_diffnet.models.spi import SpiTwinNet

    torch.manual_seed(0)
    twin = SpiTwinNet(embedding_size=8, width=4).eval()
    x = torch.rand(3, 2, SPI_GRID.size, SPI_GRID.size)
    with torch.no_grad():
        e = twin.embed(x, views=8)
        turned = twin.embed(torch.rot90(x, 1, dims=(2, 3)).flip(3), views=8)
        plain = twin.embed(x)
    assert torch.allclose(e, turned, atol=1e-5)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(plain, twin(torch.rot90(x, 1, dims=(2, 3))), atol=1e-3)  # the net alone is not invariant


def test_symmetrised_fewshot_scores_do_not_depend_on_detector_orientation():
    from dials_diffnet.models.spi import SpiTwinNet
    from dials_diffnet.spi.evaluate import twin_metrics

    torch.manual_seed(1)
    twin = SpiTwinNet(embedding_size=8, width=4).eval()
    rng = np.random.default_rng(4)
    # 2 noise settings x 2 types x 4 counts x 6 patterns (few-shot draws 5 per class)
    count = np.tile(np.repeat(np.arange(1, 5), 6), 4)
    data = {"x": rng.random((len(count), 2, SPI_GRID.size, SPI_GRID.size)).astype(np.float32), "count": count,
            "particle": np.tile(np.repeat(["a", "b"], 24), 2), "noise": np.repeat(["clean", "noisy"], 48)}
    turned = dict(data, x=np.ascontiguousarray(np.rot90(data["x"], 1, axes=(2, 3))))
    assert twin_metrics(twin, data, views=8) == twin_metrics(twin, turned, views=8)
    assert twin_metrics(twin, data) != twin_metrics(twin, turned)


def test_multi_loss_learns_the_count_of_patterns_without_a_particle_type():
    """Procedural particles carry a count but no type: the type term skips them, the count term does not."""
    from dials_diffnet.spi.train import NO_TYPE, multi_labels, multi_loss

    labels = multi_labels({"count": np.array([1, 4, 2]), "particle": np.array(["capsid", "random-7", "random-8"])})
    assert labels["type"].tolist()[1:] == [NO_TYPE, NO_TYPE] and labels["count"].tolist() == [0, 3, 1]
    labels = {k: torch.as_tensor(v) for k, v in labels.items()}
    torch.manual_seed(0)
    outputs = {"count_logits": torch.randn(3, 4, requires_grad=True), "type_logits": torch.randn(3, 8)}
    loss, parts = multi_loss(outputs, labels)
    expected_type = torch.nn.functional.cross_entropy(outputs["type_logits"][:1], labels["type"][:1])
    assert parts["type"] == pytest.approx(expected_type.item())
    untyped = {k: v[1:] for k, v in labels.items()}
    loss, parts = multi_loss({k: v[1:] for k, v in outputs.items()}, untyped)
    assert torch.isfinite(loss) and parts["type"] == 0.0
    loss.backward()
    assert outputs["count_logits"].grad[1:].abs().sum() > 0


def test_procedural_sets_extend_without_reseeding_and_reuse_a_larger_cache(tmp_path, monkeypatch):
    """The first k procedural shapes get the same seeds whatever the number asked for, so a cache of
    more shapes serves a smaller request (sliced, not re-simulated or overwritten)."""
    from dials_diffnet.spi import dataset, spi_grid

    small, large = (dataset.standard_sets(scale=0.2, random_shapes=n)["random"] for n in (2, 3))
    assert large[: len(small)] == small and len({s.particle for s in large}) == 3
    assert min(s.seed for s in large) >= SEED_BASES["random"] and len({s.seed for s in large}) == len(large)
    cache, grid = tmp_path / "random.npz", spi_grid(64)  # a coarse grid: coarse pixel bins, a quick simulation
    full = dataset.build(large, cache, grid=grid)
    assert sorted(set(full["particle"])) == ["random-0", "random-1", "random-2"] and full["x"].shape[-1] == 64

    def no_simulation(spec, grid):
        raise AssertionError("re-simulated a cached pattern")

    monkeypatch.setattr(dataset, "_tensor", no_simulation)
    part = dataset.build(small, cache, grid=grid)
    assert np.array_equal(part["x"], full["x"][: len(small)]) and list(part["seed"]) == [s.seed for s in small]
    assert list(part["particle"]) == [s.particle for s in small] and part["x"].dtype == np.float16
    assert len(np.load(cache)["seed"]) == len(large)


def test_a_larger_training_set_extends_its_cache_by_simulating_only_the_new_shots(tmp_path, monkeypatch):
    """train_per_class 2 starts with train_per_class 1's shots, so growing the training set reuses them."""
    from dials_diffnet.spi import dataset, spi_grid

    small, large = (dataset.standard_sets(scale=1.0, train_per_class=n)["train"] for n in (1, 2))
    assert large[: len(small)] == small and len({s.seed for s in large}) == len(large) == 2 * len(small)
    cache, grid = tmp_path / "train.npz", spi_grid(64)
    first = dataset.build(small, cache, grid=grid)
    simulated, simulate = [], dataset._tensor
    monkeypatch.setattr(dataset, "_tensor", lambda spec, grid: simulated.append(spec) or simulate(spec, grid))
    grown = dataset.build(large, cache, grid=grid)
    assert simulated == large[len(small):]
    assert np.array_equal(grown["x"][: len(small)], first["x"]) and list(grown["seed"]) == [s.seed for s in large]
    assert list(np.load(cache)["seed"]) == [s.seed for s in large]
    assert list(grown["count"]) == [s.count for s in large]


def test_train_from_keeps_only_the_shots_a_smaller_training_set_lacks(tmp_path):
    """--train-from 600 --train-per-class 1050 is the 1050-per-class set without its first 600 per class (what
    spi_multi's lineage trained on), cached apart from the full set."""
    from dials_diffnet.spi import dataset, spi_grid
    from dials_diffnet.spi.train import load_sets

    full = dataset.standard_sets(train_per_class=1050)["train"]
    seen = dataset.standard_sets(train_per_class=600)["train"]
    fresh = dataset.standard_sets(train_per_class=1050, train_from=600)["train"]
    assert fresh == full[len(seen):] and len(fresh) == 450 * len(seen) // 600
    assert not {s.seed for s in fresh} & {s.seed for s in seen}
    assert {(s.particle, s.count, s.noise) for s in fresh[:64]} == {(s.particle, s.count, s.noise) for s in seen}
    with pytest.raises(ValueError, match="no training shots"):
        dataset.standard_sets(train_per_class=600, train_from=600)
    # at scale 1/600: the second shot of each class only (64 shots, on a coarse grid to be quick)
    sets = load_sets(tmp_path, scale=1 / 600, workers=1, names=("train",), train_per_class=1200, train_from=600,
                     grid=spi_grid(32))
    assert [p.name.split("_x")[0] for p in (tmp_path / "grid32").glob("*.npz")] == ["train_from600"]
    assert list(sets["train"]["seed"]) == [s.seed for s in dataset.standard_sets(1 / 600, train_per_class=1200)["train"][64:]]


def test_the_crowded_set_holds_only_3_and_4_particle_training_shots_on_seeds_of_its_own():
    from dials_diffnet.spi import dataset
    from dials_diffnet.spi.particles import SEEN_TYPES

    sets = dataset.standard_sets(train_per_class=600, crowded_per_class=2)
    crowded, train = sets["crowded"], sets["train"]
    assert len(crowded) == 2 * 2 * len(SEEN_TYPES) * 2 and {s.count for s in crowded} == {3, 4}
    assert {s.particle for s in crowded} == set(SEEN_TYPES) and {s.noise for s in crowded} == {"clean", "noisy"}
    assert {s.pool for s in crowded} == {"train"}
    seeds = [s.seed for s in crowded]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & {s.seed for s in train}
    assert SEED_BASES["train"] < min(seeds) and max(seeds) < SEED_BASES["test"]
    assert "crowded" not in dataset.standard_sets(train_per_class=1)


def test_the_close_and_compact_sets_hold_only_clusters_that_overlap_in_projection_on_seeds_of_their_own():
    from dials_diffnet.spi import dataset
    from dials_diffnet.spi.particles import SEEN_TYPES

    sets = dataset.standard_sets(train_per_class=600, crowded_per_class=150, close_per_class=2, compact_per_class=2)
    close = sets["close"]
    assert len(close) == 2 * 3 * len(SEEN_TYPES) * 2 and {s.count for s in close} == {2, 3, 4}
    assert {s.particle for s in close} == set(SEEN_TYPES) and {s.pool for s in close} == {"train"}
    assert all(dataset.smallest_projected_separation(spec) < dataset.CLOSE_BELOW for spec in close)
    # a seed skipped inside a class (between its two kept shots) draws a wider cluster: the selection makes the set
    seeds = {spec.seed for spec in close}
    first, _ = next((a, b) for a, b in zip(close[::2], close[1::2]) if b.seed > a.seed + 1)
    skipped = dataclasses.replace(first, seed=first.seed + 1)
    assert skipped.seed not in seeds and dataset.smallest_projected_separation(skipped) >= dataset.CLOSE_BELOW
    assert len(seeds) == len(close) and not seeds & {s.seed for s in sets["train"] + sets["crowded"]}
    assert SEED_BASES["train"] < min(seeds) and max(seeds) < SEED_BASES["test"]
    # the compact set: 3 and 4 particles only, a pair < 0.7 diameters apart, seeds of its own
    compact = sets["compact"]
    assert len(compact) == 2 * 2 * len(SEEN_TYPES) * 2 and {s.count for s in compact} == {3, 4}
    assert all(dataset.smallest_projected_separation(spec) < dataset.COMPACT_BELOW for spec in compact)
    compact_seeds = {spec.seed for spec in compact}
    assert len(compact_seeds) == len(compact) and not compact_seeds & (seeds | {s.seed for s in sets["train"] + sets["crowded"]})
    assert max(seeds) < min(compact_seeds) and max(compact_seeds) < SEED_BASES["test"]


def test_joined_sets_read_their_patterns_in_place_as_one_array():
    from dials_diffnet.spi.dataset import joined
    from dials_diffnet.spi.train import PatternSet, training_data

    rng = np.random.default_rng(0)
    sets = {name: {"x": rng.normal(size=(n, 2, 4, 4)).astype(np.float16), "count": rng.integers(1, 5, n),
                   "particle": np.array(["capsid"] * n), "seed": np.arange(n) + 10 * n}
            for name, n in (("train", 5), ("crowded", 3))}
    data = training_data(sets, random_shapes=0)
    whole = np.concatenate([sets["train"]["x"], sets["crowded"]["x"]])
    assert len(data["x"]) == 8 and data["x"].shape == whole.shape and list(data["seed"]) == [50, 51, 52, 53, 54, 30, 31, 32]
    assert np.array_equal(data["x"][6], whole[6]) and np.array_equal(data["x"][-1], whole[-1])
    assert np.array_equal(data["x"][3:7], whole[3:7]) and np.array_equal(data["x"][[7, 0, 5]], whole[[7, 0, 5]])
    assert np.shares_memory(data["x"][6], sets["crowded"]["x"])  # a view, not a copy
    with pytest.raises(IndexError):
        data["x"][8]
    item, labels = PatternSet(data["x"], {"count": data["count"]})[5]
    assert torch.equal(item, torch.from_numpy(whole[5])) and labels["count"] == sets["crowded"]["count"][0]
    assert training_data({"train": sets["train"]}, random_shapes=0) is sets["train"]
    assert np.array_equal(joined(sets["train"])["x"][:], sets["train"]["x"])


def test_count_accuracy_is_split_by_how_far_apart_the_particles_are_in_projection():
    from dials_diffnet.spi.dataset import row_spec, smallest_projected_separation
    from dials_diffnet.spi.evaluate import accuracy_by_separation
    from dials_diffnet.spi.particles import bead_model

    seeds = np.arange(SEED_BASES["check"] + 500, SEED_BASES["check"] + 540)
    data = {"seed": seeds, "particle": np.array(["rod"] * 40), "count": np.tile([1, 2, 3, 4], 10),
            "noise": np.array(["clean"] * 40), "pool": np.array(["train"] * 40)}
    separation = np.array([smallest_projected_separation(row_spec(data, r)) for r in range(40)])
    assert np.isinf(separation[data["count"] == 1]).all()
    pairs = separation[data["count"] == 2]
    params = sim.shot_params(int(seeds[1]), "rod", 2, "clean", "train")
    assert pairs[0] == pytest.approx(np.linalg.norm(params.offsets[0, :2] - params.offsets[1, :2])
                                     / (2 * bead_model("rod").radius))
    assert (pairs <= 3.0 + 1e-9).all() and (separation[data["count"] > 1] >= 0).all()
    count_ok = separation > 0.75  # a stand-in for "counted right"
    table = accuracy_by_separation(separation, count_ok)
    assert sum(v["n"] for v in table.values()) == 30  # every multiple hit in one bin, no single hit
    assert table["0-0.5 diameters"]["count_accuracy"] in (0.0, None)
    assert table["1-inf diameters"]["count_accuracy"] == 1.0


def test_every_miscounted_shot_is_listed_with_its_seed_call_and_draws():
    from dials_diffnet.spi.dataset import row_spec, smallest_projected_separation
    from dials_diffnet.spi.evaluate import card_figures, multi_metrics

    class CallsTwo(torch.nn.Module):  # every shot called a double hit, P = e / (e + 3)
        def forward(self, x):
            count = torch.zeros(len(x), 4)
            count[:, 1] = 1.0
            return {"count_logits": count, "type_logits": torch.zeros(len(x), 8)}

    seeds = np.arange(SEED_BASES["check"] + 600, SEED_BASES["check"] + 608)
    data = {"x": np.zeros((8, 2, 4, 4), np.float16), "seed": seeds, "particle": np.array(["spike"] * 8),
            "count": np.tile([1, 2, 3, 4], 2), "noise": np.array(["noisy"] * 8), "pool": np.array(["train"] * 8)}
    rows = np.arange(1, 8)  # row 0 (a single hit) left out: it must not be listed
    metrics = multi_metrics(CallsTwo(), {"particle_types": ["spike"] * 8}, data, rows)
    errors = metrics["count_errors"]
    assert [e["seed"] for e in errors] == [int(s) for s in seeds[[2, 3, 4, 6, 7]]]
    assert [e["count"] for e in errors] == [3, 4, 1, 3, 4] and all(e["called"] == 2 for e in errors)
    assert errors[2]["closest_pair_diameters"] is None  # a single hit has no pair (JSON has no infinity)
    assert errors[0]["p_called"] == pytest.approx(np.e / (np.e + 3), abs=1e-3)
    params = sim.shot_params(int(seeds[2]), "spike", 3, "noisy", "train")
    assert errors[0]["closest_pair_diameters"] == pytest.approx(smallest_projected_separation(row_spec(data, 2)), abs=0.01)
    assert (errors[0]["energy_kev"], errors[0]["distance_mm"]) == (params.energy_kev, params.distance_mm)
    assert errors[0]["fluence_factor"] == pytest.approx(params.fluence / sim.NOMINAL_FLUENCE, abs=0.01)
    assert metrics["count_accuracy"] == pytest.approx(2 / 7)
    assert card_figures({"noisy": metrics}) == {"noisy": {k: v for k, v in metrics.items() if k != "count_errors"}}


def test_validation_sets_hold_enough_patterns_for_few_shot_scoring_at_any_scale():
    from collections import Counter

    from dials_diffnet.spi.dataset import validation_sets
    from dials_diffnet.spi.evaluate import N_SUPPORT

    for scale in (0.05, 1.0):
        for specs in validation_sets(scale).values():
            per_class = Counter((s.particle, s.count, s.noise) for s in specs)
            assert min(per_class.values()) > N_SUPPORT
            assert all(s.seed >= SEED_BASES["validation"] for s in specs)


def test_sweep_trains_a_head_per_cell_on_frozen_trunk_features():
    """The size x margin sweep (spi.evaluate --sweep): one fresh head per (E, alpha), scored few-shot."""
    from dials_diffnet.models.spi import SpiTwinNet
    from dials_diffnet.spi.evaluate import sweep

    def patterns(seed, n_per_count):
        # a level that grows with the count, so frozen random-trunk features separate single from multiple
        rng = np.random.default_rng(seed)
        counts = np.repeat(np.arange(1, 5), n_per_count)
        x = np.ones((len(counts), 2, 32, 32), np.float32)
        x[:, 0] = counts[:, None, None] + 0.1 * rng.standard_normal((len(counts), 32, 32))
        return {"x": x, "count": counts, "particle": np.array(["toy"] * len(counts)),
                "noise": np.array(["clean", "noisy"] * (len(counts) // 2))}

    torch.manual_seed(0)
    twin = SpiTwinNet(embedding_size=4, width=2).eval()
    result = sweep(twin, patterns(1, 32), patterns(2, 16), epochs=2, sizes=(2, 8), margins=(0.3,))
    assert [(r["embedding_size"], r["margin"]) for r in result["rows"]] == [(2, 0.3), (8, 0.3)]
    assert result["train_patterns"] == 128
    for row in result["rows"]:
        assert row["clean_single_vs_multi"] > 0.9 and row["noisy_single_vs_multi"] > 0.9  # chance: 0.75


def test_a_hit_head_learns_blank_frames_from_hits_and_leaves_count_and_type_untouched():
    """spi.train --only hit: only the new head learns, on the frozen trunk's features; the count and type
    logits stay exactly those of the net it was added to."""
    from dials_diffnet.spi.dataset import blank_specs
    from dials_diffnet.spi.dataset import build as build_set
    from dials_diffnet.spi.train import HIT, add_hit_head

    card = {"name": "spi_multi", "architecture": {"class": "SpiMultiNet", "n_types": 8, "n_counts": 4, "width": 4,
                                                  "patterson": "flat"}}
    torch.manual_seed(0)
    model = build(card["architecture"]).eval()
    hits = [sim.represent_shot(sim.simulate(sim.shot_params(SEED_BASES["check"] + 700 + i, "capsid", 1 + i % 4,
                                                            ("clean", "noisy")[i % 2], "train"))) for i in range(12)]
    hits = {"x": np.stack(hits)}
    blanks = build_set(blank_specs("check", 12, pool="train"))
    net, history = add_hit_head(model, card, hits, blanks, dict(HIT, epochs=40, batch=8, lr=3e-3, views=1))
    x = torch.from_numpy(np.concatenate([hits["x"], blanks["x"]])).float()
    with torch.no_grad():
        before, after = model(x), net(x)
    for key in ("count_logits", "type_logits"):
        assert torch.equal(before[key], after[key])
    called_hit = (after["hit_logits"] > 0).numpy()
    assert np.mean(called_hit == np.repeat([True, False], 12)) >= 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_hit_bar_is_the_largest_candidate_keeping_the_noisy_hits_and_dropping_blanks():
    from dials_diffnet.spi.train import hit_operating_point

    noise = np.array(["noisy"] * 100 + ["clean"] * 100)
    hits = np.concatenate([np.linspace(0.25, 1, 100), np.ones(100)])  # every noisy hit at >= 0.25
    blanks = np.linspace(0, 0.15, 100)  # every blank below 0.2, a third at >= 0.1
    point = hit_operating_point(hits, noise, blanks)
    assert point["min_p_hit"] == 0.2 and point["met"]
    point = hit_operating_point(hits, noise, np.full(100, 0.6))  # blanks everywhere: no candidate passes
    assert point["min_p_hit"] == 0.5 and not point["met"]
