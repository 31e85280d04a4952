"""dials-diffnet: deep-learning judgement of diffraction images inside DIALS."""

import os
import sys

__version__ = "0.1.0"


def _point_libtbx_at_base_install():
    """In a venv over a system cctbx (Debian's DIALS), libtbx looks for its environment under the
    venv's prefix, finds nothing and crashes on import; point it at the base installation's one.
    A LIBTBX_BUILD set by the user is left alone."""
    if os.environ.get("LIBTBX_BUILD"):
        return
    tail = os.path.join("lib", "cctbx", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    own, base = os.path.join(sys.prefix, tail), os.path.join(sys.base_prefix, tail)
    if not os.path.isfile(os.path.join(own, "libtbx_env")) and os.path.isfile(os.path.join(base, "libtbx_env")):
        os.environ["LIBTBX_BUILD"] = base


_point_libtbx_at_base_install()
