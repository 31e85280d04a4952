"""Test-time averaging over the grid's square symmetries.

The grid is centred on the beam, so a 90-degree turn or a mirror of it is the
same shot seen by a detector mounted differently: every judgement (resolution,
hit, lattice count, particle count) is unchanged. The networks learnt that only
approximately (training draws one of the 8 views per image), so averaging their
outputs over several views removes part of their error, at one forward pass per view.
"""

from __future__ import annotations

import torch
from torch import nn

# (quarter turns, mirror) in the order views are added: the first n of them are the n views used.
SQUARE_VIEWS = ((0, False), (2, False), (1, False), (3, False), (0, True), (2, True), (1, True), (3, True))
VIEW_COUNTS = (1, 2, 4, 8)


def check_view_count(n_views) -> int:
    """n_views if it is one of VIEW_COUNTS, else ValueError."""
    if n_views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {', '.join(map(str, VIEW_COUNTS))}, not {n_views}")
    return n_views


def square_view(x: torch.Tensor, quarter_turns: int, mirror: bool) -> torch.Tensor:
    """x (N, C, S, S) turned by quarter_turns x 90 degrees about the grid centre, then mirrored."""
    x = torch.rot90(x, quarter_turns, dims=(2, 3))
    return x.flip(3) if mirror else x


class ViewAveraged(nn.Module):
    """`model`'s outputs (a tensor or a dict of tensors) averaged over the first `n_views` SQUARE_VIEWS.

    Logits are averaged as logits, 1/d as 1/d."""

    def __init__(self, model: nn.Module, n_views: int):
        super().__init__()
        self.model, self.n_views = model, check_view_count(n_views)

    def forward(self, x):
        if self.n_views == 1:
            return self.model(x)
        outs = [self.model(square_view(x, k, m)) for k, m in SQUARE_VIEWS[: self.n_views]]
        if isinstance(outs[0], dict):
            return {key: torch.stack([o[key] for o in outs]).mean(0) for key in outs[0]}
        return torch.stack(outs).mean(0)
