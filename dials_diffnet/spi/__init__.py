"""XFEL single-particle imaging (SPI): simulator, CXI I/O, training, evaluation and the `spi` task.

SPI patterns go through the same `representation.represent` as crystallography,
on a small-angle grid: 128 x 128 cells out to |q| = 0.012 1/A (d = 83 A) at the
grid's inner edge, cell 1.9e-4 1/A. A 76 nm capsid's speckles then span ~7 cells
and the fringes of particles 1-2 diameters apart 2-4 cells; a 12 nm particle's
whole central speckle fits in the grid.
"""

from dials_diffnet.representation import GridSpec

SPI_GRID = GridSpec(size=128, s_max=0.012)
