"""Small helpers shared by the commands: PHIL loading, one-line Sorry, safe output files."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import pathlib
import re
import tempfile

import libtbx.phil
from dials.util import Sorry


_UMASK = os.umask(0)
os.umask(_UMASK)


def load_phil(name: str) -> libtbx.phil.scope:
    """Parse `phil/<name>.phil`, shipped as package data of dials_diffnet.phil."""
    text = importlib.resources.files("dials_diffnet.phil").joinpath(f"{name}.phil").read_text()
    return libtbx.phil.parse(text)


def one_line(message) -> str:
    """A message squeezed onto one line, as a Sorry should be."""
    return " ".join(str(message).split())


def parse_command_line(parser, args, return_unhandled=True):
    """parser.parse_args, with PHIL's own errors (a bad value raises RuntimeError) as a one-line Sorry.

    Every diffnet command parses through here, so they all refuse a bad value the same way.
    """
    try:
        return parser.parse_args(args=args, show_diff_phil=False, return_unhandled=return_unhandled)
    except (Sorry, RuntimeError) as e:
        raise Sorry(phil_error(parser.system_phil, e)) from None


def phil_error(master, error) -> str:
    """PHIL's message on one line; for a value that is not a number, or None where None is not allowed,
    also what the parameter takes (its PHIL type)."""
    message = one_line(error)
    bad = re.match(r'Error interpreting (\S+)="(.*?)" as a numeric expression', message) or re.fullmatch(
        r"(\S+) cannot be (None)", message)
    if bad:
        name, value = bad.groups()
        types = {d.path: d.object.type for d in master.all_definitions()}
        wanted = re.sub(r",? ?allow_none=\w+", "", str(types.get(name))).replace("()", "")
        message = f"{name}={value} is not {'a number' if value != 'None' else 'allowed'}: {name} takes {wanted}"
    return message


def check_outputs(outputs: dict, inputs) -> None:
    """Sorry unless every output path is distinct, overwrites no input and lies in a writable directory.

    Checked before any work, so a long run never fails at the end for want of a place to write.
    """
    input_paths = {os.path.realpath(p) for p in inputs if p}
    seen = {}
    for param, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if real in input_paths:
            raise Sorry(f"{param}={path} is also an input file; choose another output name")
        if real in seen:
            raise Sorry(f"{param}={path} and {seen[real]} name the same file")
        seen[real] = param
        directory = os.path.dirname(real)
        try:
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".diffnet-probe-")
        except OSError as e:
            raise Sorry(f"cannot write {param}={path}: {e.strerror} ({directory})") from None
        os.close(fd)
        os.unlink(probe)


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to `path`; move it into place only if the block finishes.

    An interrupted run leaves either the old file or the complete new one, never half a file.
    The temporary name keeps the extension because DIALS writers choose the format by it.
    """
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_output(path) as tmp:
        pathlib.Path(tmp).write_text(text)
