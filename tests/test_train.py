"""diffnet.train on toy shard datasets: reading, splitting, augmentation, loss, learning, checkpoints."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dials_diffnet.datasets import (DatasetError, ShardDataset, ShardSampler, split_indices, square_symmetry,
                                    write_index, write_shard)
from dials_diffnet.models.resnet import CrystalNet, radius_plane
from dials_diffnet.train import crystal_loss, fit, initialise_from, training_memory_format
from dials_diffnet.weights import load_model, save_model


def make_toy_dataset(directory, n_images=64, size=256, n_shards=2, seed=0, compressed=False, planes=2):
    """Shards whose answer is visible: a bright ring at radius s_min (grid edge = 0.8 1/A) on hits,
    40 bright isolated pixels on multi-lattice images, noise everywhere, a validity disk.
    planes=3 adds a third plane of noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    s_of_cell = np.hypot(yy, xx) / (size / 2) * 0.8
    valid = (s_of_cell < 0.77).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    names, n = [], n_images // n_shards
    for k in range(n_shards):
        is_hit = rng.random(n) < 0.8
        is_multi = is_hit & (rng.random(n) < 0.5)
        s_min = np.where(is_hit, rng.uniform(0.25, 0.7, n), 0.0)
        x = np.zeros((n, planes, size, size), np.float32)
        x[:, 1] = valid
        x[:, 2:] = rng.normal(0, 1, (n, planes - 2, size, size)) * valid
        for i in range(n):
            image = rng.normal(0, 0.3, (size, size))
            if is_hit[i]:
                image += 3.0 * np.exp(-0.5 * ((s_of_cell - s_min[i]) / 0.01) ** 2)
            if is_multi[i]:
                r, c = rng.integers(size // 5, 4 * size // 5, (2, 40))
                image[r, c] += 6.0
            x[i, 0] = image * valid
        labels = {
            "s_min": s_min,
            "d_min": np.where(is_hit, 1 / np.maximum(s_min, 1e-6), np.inf),
            "edge_limited": is_hit & (rng.random(n) < 0.1),
            "is_hit": is_hit,
            "is_multi": is_multi,
            "n_lattices": is_hit.astype(int) + is_multi,
            "minority_share": np.where(is_multi, rng.uniform(0.1, 0.5, n), 0.0),
            "misorientation_deg": np.where(is_multi, rng.uniform(0, 90, n), np.nan),
            "detector": np.array(["toy"] * n),
            "seed": 1000 * seed + k * n + np.arange(n),
        }
        name = f"shard_{k:05d}.npz"
        write_shard(directory / name, x, labels)
        if compressed:  # what np.savez_compressed would have written
            with np.load(directory / name) as z:
                arrays = dict(z)
            np.savez_compressed(directory / name, **arrays)
        names.append(name)
    recipe = {"kind": "toy", "seed": seed, "labels": {"s_min": "ring radius in the toy grid"}}
    write_index(directory, names, n * n_shards, recipe=recipe, grid=(size, 0.8), planes=planes)
    return directory


@pytest.fixture(scope="module")
def toy256(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy256", n_images=128, size=256)


@pytest.fixture(scope="module")
def toy128(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy128", n_images=128, size=128, seed=2)


@pytest.fixture(scope="module")
def toy64(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy64", n_images=32, size=64, seed=1)


def test_shards_memory_map_and_compressed_shards_read_the_same(toy64, tmp_path):
    mapped = ShardDataset(toy64)
    packed = ShardDataset(make_toy_dataset(tmp_path / "packed", n_images=32, size=64, seed=1, compressed=True))
    assert mapped.memory_mapped() and not packed.memory_mapped()
    assert len(mapped) == len(packed) == 32 and mapped.grid == (64, 0.8)
    for i in (0, 17, 31):  # the second shard starts at 16
        (xa, la), (xb, lb) = mapped[i], packed[i]
        assert xa.dtype == torch.float16 and xa.shape == (2, 64, 64)
        assert torch.equal(xa, xb) and all(torch.equal(la[k], lb[k]) for k in la)
    # A windowed sampler visits every item once and keeps shards together.
    order = list(ShardSampler(packed, seed=3, window=1))
    assert sorted(order) == list(range(32))
    shard = packed.shard_of_items()[order]
    assert (np.diff(shard) != 0).sum() == 1


def test_split_is_seeded_per_image_and_disjoint(toy256):
    data = ShardDataset(toy256)
    train, val = split_indices(data, 0.25, seed=7)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(data)
    assert 0.1 < len(val) / len(data) < 0.4
    again = split_indices(data, 0.25, seed=7)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(split_indices(data, 0.25, seed=8)[1], val)
    # Decided by each image's seed, so it does not depend on which shards are read.
    one_shard = ShardDataset(toy256).subset(np.arange(64))
    seeds_val = set(data.labels_all["seed"][val])
    _, val_first = split_indices(one_shard, 0.25, seed=7)
    assert set(data.labels_all["seed"][val_first[val_first < 64]]) == {s for s in seeds_val if s < 64}


def test_augmentation_is_a_symmetry_of_the_grid_and_repeatable(toy64):
    plain, augmented = ShardDataset(toy64), ShardDataset(toy64, augment=True, seed=5)
    x, labels = plain[3]
    seen = set()
    for epoch in range(12):
        augmented.set_epoch(epoch)
        y, labels_y = augmented[3]
        assert all(torch.equal(labels[k], labels_y[k]) for k in labels)
        # Some rotation/flip of the original, exactly.
        candidates = [torch.rot90(x, k, (1, 2)) for k in range(4)]
        candidates += [torch.flip(c, (2,)) for c in candidates]
        matches = [i for i, c in enumerate(candidates) if torch.equal(c, y)]
        assert matches
        seen.add(matches[0])
        augmented.set_epoch(epoch)
        assert torch.equal(augmented[3][0], y)  # same (seed, epoch, image) -> same draw
    assert len(seen) >= 3


def test_bad_datasets_are_refused(tmp_path, toy64):
    with pytest.raises(DatasetError, match="no index.json"):
        ShardDataset(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"representation_version": 99, "grid": [64, 0.8], "shards": []}))
    with pytest.raises(DatasetError, match="representation version 99"):
        ShardDataset(tmp_path)
    index = json.loads((toy64 / "index.json").read_text())
    index["shards"].append("shard_00009.npz")
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="missing"):
        ShardDataset(tmp_path)


def test_loss_resolution_only_on_hits_and_one_sided_at_the_edge():
    def loss_of(s_pred, s_label, edge, hit):
        outputs = {"s_min": torch.tensor([s_pred]), "multi_logit": torch.tensor([2.0]), "hit_logit": torch.tensor([0.0])}
        labels = {"s_min": torch.tensor([s_label]), "edge_limited": torch.tensor([edge]),
                  "is_hit": torch.tensor([hit]), "is_multi": torch.tensor([False])}
        return crystal_loss(outputs, labels)[1]

    assert loss_of(0.5, 0.5, False, True)["resolution"] == 0
    assert loss_of(0.6, 0.5, False, True)["resolution"] > 0  # better than the label: wrong when not edge-limited
    assert loss_of(0.6, 0.5, True, True)["resolution"] == 0  # edge-limited: at least as good costs nothing
    assert loss_of(0.4, 0.5, True, True)["resolution"] == pytest.approx(loss_of(0.4, 0.5, False, True)["resolution"])
    blank = loss_of(0.4, 0.0, False, False)  # blanks: no resolution or multi-lattice loss, only hit loss
    assert blank["resolution"] == 0 and blank["multi"] == 0 and blank["hit"] > 0
    assert loss_of(0.4, 0.5, False, True)["multi"] > 0


def test_loss_weights_scale_the_hit_and_multi_lattice_terms_only():
    outputs = {"s_min": torch.tensor([0.4, 0.3]), "multi_logit": torch.tensor([2.0, -1.0]), "hit_logit": torch.tensor([0.5, -0.5])}
    labels = {"s_min": torch.tensor([0.5, 0.0]), "edge_limited": torch.tensor([False, False]),
              "is_hit": torch.tensor([True, False]), "is_multi": torch.tensor([False, False])}
    plain, parts = crystal_loss(outputs, labels)
    weighted, weighted_parts = crystal_loss(outputs, labels, hit_weight=3.0, multi_weight=0.5)
    assert weighted_parts == parts  # the logged terms stay unweighted
    assert plain.item() == pytest.approx(parts["resolution"] + parts["multi"] + parts["hit"])
    assert weighted.item() == pytest.approx(parts["resolution"] + 0.5 * parts["multi"] + 3.0 * parts["hit"])


def test_training_command_learns_and_writes_loadable_weights(toy128, tmp_path, monkeypatch):
    from diffnet.train import run

    monkeypatch.chdir(tmp_path)
    run([str(toy128), "model.width=8", "threads=1", "epochs=6", "batch_size=16", "lr=3e-3", "val_fraction=0.2", "seed=1",
         "loss.hit_weight=2", "output.weights=toy.safetensors"])
    model, card = load_model(tmp_path / "toy.safetensors")
    history = card["training"]["history"]
    assert len(history) == 6
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert card["validation"]["resolution"]["pearson_r_inv_d"] > 0.8
    assert card["validation"]["hit"]["accuracy"] > 0.8
    assert card["architecture"] == {"class": "CrystalNet", "depth": 18, "width": 8, "in_channels": 2, "radius_channel": False}
    assert card["input_planes"] == ["log_max", "valid"]
    assert card["labels"] == {"s_min": "ring radius in the toy grid"}  # taken from the dataset recipe
    assert card["training"]["data"][0]["recipe"]["seed"] == 2 and card["training"]["seed"] == 1
    assert card["training"]["wall_time_s"] > 0 and card["training"]["device"].startswith("cpu")
    assert card["training"]["precision"] == "float32"  # precision=auto, resolved for the CPU it ran on
    assert card["training"]["loss_weights"] == {"hit": 2.0, "multi": 1.0} and card["training"]["loss"].startswith("2 BCE(hit)")
    assert (tmp_path / "diffnet.train.checkpoint" / "last.json").is_file()
    # The loaded weights reproduce the card's validation figures.
    from dials_diffnet.evaluate import evaluate_crystal

    data = ShardDataset(toy128)
    metrics, _ = evaluate_crystal(model, data.subset(split_indices(data, 0.2, 1)[1]), torch.device("cpu"))
    assert metrics["resolution"]["pearson_r_inv_d"] == pytest.approx(card["validation"]["resolution"]["pearson_r_inv_d"], abs=1e-4)


def test_radius_plane_is_the_resolution_coordinate_and_survives_augmentation():
    plane = radius_plane(torch.zeros(2, 2, 64, 64, dtype=torch.float64))[0, 0].numpy()
    s_max = 0.8
    # Cell (row, col) of a 64-cell grid reaching 0.8 1/A covers |q| = hypot of its centre's offsets.
    centre = (np.arange(64) + 0.5) * (2 * s_max / 64) - s_max
    np.testing.assert_allclose(plane * s_max, np.hypot(centre[:, None], centre[None, :]), atol=1e-12)
    assert plane.min() == pytest.approx(np.sqrt(2) / 64) and plane[0, 0] == pytest.approx(np.sqrt(2) * 63 / 64)
    for key in range(8):  # every augmentation leaves each cell's |q| where it was
        np.testing.assert_array_equal(square_symmetry(plane[None], key)[0], plane)


def _saved_width4_model(path, radius_channel):
    """A CrystalNet(18, 4) in eval mode, saved with a crystal card; returns it and its architecture."""
    model = CrystalNet(18, 4, radius_channel=radius_channel).eval()
    for m in model.modules():  # non-trivial statistics, so that a check of kept predictions means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    arch = {"class": "CrystalNet", "depth": 18, "width": 4, "in_channels": 2}
    if radius_channel:
        arch["radius_channel"] = True
    save_model(model, {"name": "old", "task": "crystal", "version": "t", "architecture": arch}, path)
    return model, arch


def test_initialising_from_a_trained_model_keeps_its_predictions(tmp_path):
    torch.manual_seed(0)
    old, arch = _saved_width4_model(tmp_path / "old.safetensors", radius_channel=False)
    new = CrystalNet(18, 4, radius_channel=True)
    info = initialise_from(new, tmp_path / "old.safetensors")
    assert info["name"] == "old" and info["architecture"] == arch
    x = torch.randn(3, 2, 64, 64)
    with torch.no_grad():
        before, after = old(x), new.eval()(x)
    for name in CrystalNet.OUTPUTS:
        torch.testing.assert_close(after[name], before[name])
    # ... and the new plane is learnable: its stem weights get a gradient.
    new.train()(x)["s_min"].sum().backward()
    assert new.backbone.stem[0].weight.grad[:, 2].abs().sum() > 0
    with pytest.raises(ValueError, match="width may only grow"):
        initialise_from(CrystalNet(18, 2), tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="depth must match"):
        initialise_from(CrystalNet(34, 4), tmp_path / "old.safetensors")
    save_model(old, {"name": "spi", "task": "spi_multi", "architecture": arch}, tmp_path / "spi.safetensors")
    with pytest.raises(ValueError, match="not a crystal model"):
        initialise_from(new, tmp_path / "spi.safetensors")


def test_a_model_given_the_snr_plane_reads_three_plane_sets_and_starts_from_the_old_predictions(tmp_path):
    torch.manual_seed(2)
    three = make_toy_dataset(tmp_path / "three", n_images=8, size=64, planes=3)
    two_of_three, all_three = ShardDataset(three), ShardDataset(three, planes=3)
    assert two_of_three[0][0].shape == (2, 64, 64) and all_three[0][0].shape == (3, 64, 64)
    assert torch.equal(two_of_three[5][0], all_three[5][0][:2])  # a 2-plane model reads the leading planes
    with pytest.raises(DatasetError, match="holds 2 representation planes; this model reads 3"):
        ShardDataset(make_toy_dataset(tmp_path / "two", n_images=4, size=64), planes=3)
    old, _ = _saved_width4_model(tmp_path / "old.safetensors", radius_channel=True)
    new = CrystalNet(18, 4, in_channels=3, radius_channel=True)
    initialise_from(new, tmp_path / "old.safetensors")
    x = torch.stack([all_three[i][0].float() for i in range(4)])
    with torch.no_grad():
        before, after = old(x[:, :2]), new.eval()(x)
    for name in CrystalNet.OUTPUTS:
        torch.testing.assert_close(after[name], before[name])
    stem, old_stem = new.backbone.stem[0].weight, old.backbone.stem[0].weight
    torch.testing.assert_close(stem[:, 2], old_stem[:, 2])  # the radius plane keeps its place and weights
    new.train()(x)["s_min"].sum().backward()
    assert stem.grad[:, 3].abs().sum() > 0  # the SNR plane (input 3, zero weight so far) learns


def test_a_wider_model_initialised_from_a_narrow_one_starts_with_its_predictions_and_learns(tmp_path):
    torch.manual_seed(1)
    old, _ = _saved_width4_model(tmp_path / "old.safetensors", radius_channel=True)
    wide = CrystalNet(18, 6, radius_channel=True)
    initialise_from(wide, tmp_path / "old.safetensors")
    x = torch.randn(3, 2, 64, 64)
    with torch.no_grad():
        before = old(x)
        after_eval, after_train = wide.eval()(x), wide.train()(x)
    for name in CrystalNet.OUTPUTS:
        torch.testing.assert_close(after_eval[name], before[name])
    # In training mode batch statistics replace the running ones: the old channels' are unchanged too.
    torch.testing.assert_close(after_train["s_min"], old.train()(x)["s_min"])
    # The new channels are not dead: the zero weights from them into old channels get gradients.
    wide.zero_grad()
    wide(x)["s_min"].sum().backward()
    assert wide.head.weight.grad[:, old.backbone.n_features:].abs().sum() > 0
    assert wide.backbone.stages[0].conv2.weight.grad[:4, 4:].abs().sum() > 0


def test_resume_after_interruption_matches_uninterrupted_training(toy64, tmp_path):
    torch.set_num_threads(1)

    def train(checkpoint_dir, resume=False, stop_after_steps=None):
        torch.manual_seed(0)
        data = ShardDataset(toy64, augment=True, seed=0)
        train_idx, val_idx = split_indices(data, 0.25, 0)
        train_set = data.subset(train_idx)
        loader = torch.utils.data.DataLoader(train_set, batch_size=8, sampler=ShardSampler(train_set, 0))
        val_loader = torch.utils.data.DataLoader(data.subset(val_idx, augment=False), batch_size=8)
        model = CrystalNet(18, 4)
        steps = []

        def loss_fn(outputs, labels):
            if torch.is_grad_enabled():
                steps.append(1)
                if stop_after_steps is not None and len(steps) > stop_after_steps:
                    raise KeyboardInterrupt
            return crystal_loss(outputs, labels)

        result = fit(model, loss_fn, loader, val_loader, epochs=3, lr=2e-3, checkpoint_dir=checkpoint_dir,
                     resume=resume, config={"test": 1, "epochs": 3})
        return model, result

    reference, ref_result = train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", stop_after_steps=5)  # 3 steps per epoch: dies inside epoch 2
    assert json.loads((tmp_path / "b" / "last.json").read_text())["epoch"] == 1
    resumed, result = train(tmp_path / "b", resume=True)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert result["history"][-1]["val_loss"] == ref_result["history"][-1]["val_loss"]
    # Resuming with other settings is refused.
    with pytest.raises(ValueError, match="other settings"):
        fit(CrystalNet(18, 4), crystal_loss, [], None, epochs=3, checkpoint_dir=tmp_path / "b", resume=True, config={"test": 2})


def test_command_line_errors_are_one_line(tmp_path, toy64):
    from dials.util import Sorry

    from diffnet.train import run

    for args, message in ((["nonsense=1"], "nonsense"), ([str(toy64), "model.depth=20"], "choose one of"),
                          ([str(toy64), "device=cuda:99"], "no CUDA device"),
                          ([str(toy64), "precision=half"], "precision"),
                          ([str(toy64), f"model.init={tmp_path}/missing.safetensors"], "missing")):
        with pytest.raises(Sorry, match=message):
            run(args)
    done = subprocess.run([sys.executable, "-m", "diffnet.train", f"data.train={tmp_path}"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "no index.json" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr


def test_narrow_nets_train_channels_first_on_the_cpu_where_onednn_corrupts_channels_last():
    """On AVX2-only CPUs oneDNN corrupts the heap training channels-last convolutions narrower than 8
    channels (the width-4 nets of these tests aborted the test run); wider nets keep the fast layout."""
    assert training_memory_format(CrystalNet(18, 4), "cpu") == torch.contiguous_format
    assert training_memory_format(CrystalNet(18, 8), "cpu") == torch.channels_last
    assert training_memory_format(CrystalNet(18, 4), "cuda") == torch.channels_last
    model = CrystalNet(18, 4)
    x = torch.randn(4, 2, 256, 256)
    for _ in range(2):  # forward and backward twice in the layout fit picks: completes without a crash
        sum(v.sum() for v in model(x.contiguous(memory_format=training_memory_format(model, "cpu"))).values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
