"""Coarsening a represented image is the representation on the coarser grid (models/grids.py)."""

import numpy as np
import pytest
import torch

from dials_diffnet.models.grids import Coarsened, coarsen, coarsening_factor
from dials_diffnet.representation import GridSpec, cached_grid_map, represent
from dials_diffnet.spi import simulate as sim

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shot():
    return sim.simulate(sim.shot_params(4_000_321, "capsid", 3, "noisy", "test"))


def test_coarsened_representation_equals_the_coarse_grid_representation(shot):
    fine = GridSpec(256, 0.012)
    x = represent([shot.image], [shot.valid], cached_grid_map((shot.panel,), shot.beam, fine))
    for size in (128, 64):
        coarse = GridSpec(size, 0.012)
        want = represent([shot.image], [shot.valid], cached_grid_map((shot.panel,), shot.beam, coarse))
        got = coarsen(torch.from_numpy(x)[None], coarsening_factor(fine, coarse))[0].numpy()
        assert np.array_equal(got[1], want[1])  # the same cells saw a valid pixel
        assert np.abs(got[0] - want[0]).max() < 1e-5
        assert np.abs(want[0]).max() > 1.0  # a real pattern, not two blank grids


def test_coarsening_a_blank_grid_and_grids_that_do_not_nest():
    x = torch.zeros(2, 2, 8, 8)
    x[1, 1, :4] = 1.0  # half the cells valid, all at the median level
    out = coarsen(x, 2)
    assert out.shape == (2, 2, 4, 4) and torch.isfinite(out).all()
    assert out[0].abs().sum() == 0 and out[1, 1, :2].eq(1).all() and out[1, 1, 2:].eq(0).all()
    assert coarsening_factor(GridSpec(256, 0.012), GridSpec(256, 0.012)) == 1
    for coarse in (GridSpec(128, 0.024), GridSpec(96, 0.012), GridSpec(85, 0.012)):
        with pytest.raises(ValueError, match="does not nest"):
            coarsening_factor(GridSpec(256, 0.012), coarse)


def test_coarsened_model_sees_the_coarse_input():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape)
            return x.sum((1, 2, 3))

        def embed(self, x, views=1):
            seen.append((x.shape, views))
            return x.mean((2, 3))

    x = torch.rand(3, 2, 16, 16)
    x[:, 1] = 1.0
    model = Coarsened(Probe(), 4)
    model(x), model.embed(x, 8)
    assert seen == [(3, 2, 4, 4), ((3, 2, 4, 4), 8)]
