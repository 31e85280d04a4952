"""XFEL single-particle imaging (SPI): simulator, CXI I/O, training, evaluation and the `spi` task.

SPI patterns go through the same `representation.represent` as crystallography,
on a small-angle grid out to |q| = 0.012 1/A (d = 83 A) at the grid's inner edge.
SPI_GRID, 256 x 256 cells of 9.4e-5 1/A, is the finest grid an SPI model reads and
the one `diffnet.predict task=spi` represents images on (both shipped networks read
it); a model trained on a coarser grid of the same reach is fed the exactly
coarsened input (models/grids.py). A 76 nm capsid's speckles span ~14 cells of
SPI_GRID, fringes of particles 1-3 diameters apart 2-8 cells, and the field of view
of the pattern's autocorrelation (1 / cell) is ~1 um, wider than a 4-particle cluster.
"""

from dials_diffnet.representation import GridSpec

SPI_GRID = GridSpec(size=256, s_max=0.012)


def spi_grid(size: int) -> GridSpec:
    """An SPI grid of `size` cells with SPI_GRID's reach (so it nests in SPI_GRID when size divides 256)."""
    return GridSpec(size=size, s_max=SPI_GRID.s_max)
