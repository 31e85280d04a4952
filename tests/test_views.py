"""Averaging over the grid's square symmetries (models.views): what diffnet.predict views= runs."""

from __future__ import annotations

import pytest
import torch

from dials_diffnet.models import build
from dials_diffnet.models.views import SQUARE_VIEWS, ViewAveraged, square_view


@pytest.fixture(scope="module")
def crystal_net():
    torch.manual_seed(0)
    return build({"class": "CrystalNet", "depth": 18, "width": 4}).eval()


def test_eight_views_make_every_judgement_invariant_under_the_grids_symmetries(crystal_net):
    x = torch.randn(2, 2, 64, 64)
    averaged = ViewAveraged(crystal_net, 8)
    with torch.no_grad():
        reference = averaged(x)
        for k, mirror in SQUARE_VIEWS:
            turned = averaged(square_view(x, k, mirror))
            for key in crystal_net.OUTPUTS:
                assert torch.allclose(turned[key], reference[key], rtol=1e-4, atol=1e-5), (k, mirror, key)
        # the network alone is not invariant: that is what the averaging removes
        assert not torch.allclose(crystal_net(x)["s_min"], crystal_net(square_view(x, 1, False))["s_min"], atol=1e-4)


def test_one_view_is_the_network_and_two_are_the_mean_with_the_half_turn(crystal_net):
    x = torch.randn(3, 2, 64, 64)
    with torch.no_grad():
        plain, half_turn = crystal_net(x), crystal_net(torch.rot90(x, 2, dims=(2, 3)))
        one, two = ViewAveraged(crystal_net, 1)(x), ViewAveraged(crystal_net, 2)(x)
    for key in crystal_net.OUTPUTS:
        assert torch.equal(one[key], plain[key])
        assert torch.allclose(two[key], (plain[key] + half_turn[key]) / 2, atol=1e-6)


def test_views_are_the_eight_distinct_symmetries_of_the_square():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    images = {tuple(square_view(x, k, m).flatten().tolist()) for k, m in SQUARE_VIEWS}
    assert len(images) == 8


@pytest.mark.parametrize("n_views", [0, 3, 16])
def test_other_view_counts_are_refused(crystal_net, n_views):
    with pytest.raises(ValueError, match="views must be one of 1, 2, 4, 8"):
        ViewAveraged(crystal_net, n_views)
