# Two entry points (see README): `make demo` and `make test`. Both do the whole set-up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# libtbx needs to know where Debian put the cctbx build, or it crashes inside a venv.
export LIBTBX_BUILD := /usr/lib/cctbx/python3.11
export OMP_NUM_THREADS ?= 2
# idle OpenMP threads sleep instead of spinning (3-4x faster torch on a shared CPU)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test train-crystal train-spi clean

# bitshuffle: the HDF5 filter (32008) Eiger NeXus files are compressed with; Debian's DIALS lacks it.
$(VENV)/.dials: Makefile
	@if ! /usr/bin/python3 -c "import dials, dxtbx, h5py; assert h5py.h5z.filter_avail(32008)" >/dev/null 2>&1; then \
		echo "Installing Debian's DIALS and the bitshuffle HDF5 filter (apt-get install dials bitshuffle)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dials bitshuffle >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

$(VENV)/.installed: $(VENV)/.dials setup.py
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q torch==2.13.0 safetensors pytest
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# The main job on built-in defaults: simulate stills as CBF files, import them with DIALS,
# predict with the shipped models, filter, and index what is kept.
demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q tests

# Reproduce the shipped models (hours on 2 CPU cores; see dials_diffnet/weights/*.json).
train-crystal: setup
	bash scripts/train_crystal.sh

train-spi: setup
	bash scripts/train_spi.sh

clean:
	rm -rf $(VENV) *.egg-info
