"""The diffnet commands: command_line/<name>.py is `diffnet.<name>` and `python -m diffnet.<name>`."""

import os

import dials_diffnet  # noqa: F401  (before anything imports libtbx: it finds libtbx a venv over a system DIALS)

# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning made training 3-4x
# slower (resnet18 width 16, 2 threads, load ~6 on 2 cores: 4.3 -> 15.9 images/s). This package
# is imported before any command module loads torch; an explicit environment setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# torch must load before DIALS: Debian's cctbx loads libomptbx (an OpenMP stub whose omp_* always
# answer one thread) into the global symbol table, and a torch loaded after it binds to the stub and
# runs every model on one thread whatever torch.set_num_threads asks.
import torch  # noqa: E402,F401
