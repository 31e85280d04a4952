import os
import pathlib
import sys

import pytest

os.environ.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")
# the console scripts (diffnet.predict, ...) live beside the interpreter running the tests
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]

REPO = pathlib.Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata_dir():
    if not REALDATA.is_dir():
        pytest.skip(f"{REALDATA} not present")
    return REALDATA


def realdata_files():
    """Every real image, one entry per dataset (the l-cysteine frames import together)."""
    if not REALDATA.is_dir():
        return []
    singles = sorted(p for p in REALDATA.iterdir() if p.is_file() and p.name != "README.md")
    return singles + [REALDATA / "l_cysteine"]
