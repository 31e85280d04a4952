"""Models trained on a coarser grid than the one a task represents its images on.

`representation.represent` keeps each cell's largest valid pixel (log1p), minus the
median over the cells that saw a valid pixel. Two grids of the same reach whose
sizes differ by a power of two nest exactly (every coarse cell is a block of fine
cells, to the last floating-point bit), so the coarse representation is the fine
one max-pooled over seen cells and re-centred on its own median. A task therefore
reads the pixels once, on the finest grid any of its models needs.
"""

from __future__ import annotations

import torch
from torch import nn

from dials_diffnet.representation import GridSpec


def coarsening_factor(fine: GridSpec, coarse: GridSpec) -> int:
    """How many fine cells span one coarse cell; ValueError where the grids do not nest."""
    factor = fine.size // coarse.size
    if fine.s_max != coarse.s_max or factor * coarse.size != fine.size or factor & (factor - 1):
        raise ValueError(f"grid {coarse} does not nest in grid {fine}: same reach and a power-of-two size ratio needed")
    return factor


def coarsen(x: torch.Tensor, factor: int) -> torch.Tensor:
    """represent()'s output (N, 2, S, S) as it would be on the grid of S / factor cells (float32 rounding aside)."""
    if factor == 1:
        return x
    seen = x[:, 1:] > 0
    pooled = nn.functional.max_pool2d(x[:, :1].masked_fill(~seen, float("-inf")), factor)
    seen_coarse = nn.functional.max_pool2d(seen.float(), factor) > 0
    # np.median's convention (mean of the middle two), as represent() uses
    median = torch.nanquantile(pooled.masked_fill(~seen_coarse, float("nan")).flatten(1), 0.5, dim=1)
    level = (pooled - median[:, None, None, None]).masked_fill(~seen_coarse, 0.0)
    return torch.cat([level, seen_coarse.to(x.dtype)], 1)


class Coarsened(nn.Module):
    """`model`, fed the coarsened input (and its `embed`, where it has one)."""

    def __init__(self, model: nn.Module, factor: int):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(coarsen(x, self.factor))

    def embed(self, x, views: int = 1):
        return self.model.embed(coarsen(x, self.factor), views)
