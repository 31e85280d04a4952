"""The commands as a pipeline calls them: console script and `python -m` agree; bad parameters are one-line Sorry."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
from test_predict import BIN

COMMANDS = ["predict", "filter", "simulate", "evaluate", "train"]


def command(*args, cwd=None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("name", ["predict", "filter"])
def test_module_and_console_script_print_the_same_phil(name):
    by_module = command(sys.executable, "-m", f"diffnet.{name}", "-c", "-a", "2")
    by_script = command(BIN / f"diffnet.{name}", "-c", "-a", "2")
    assert by_module.returncode == by_script.returncode == 0, by_module.stderr + by_script.stderr
    assert by_module.stdout == by_script.stdout
    for parameter in ("batch_size", "nproc", "device", "model", "output"):
        assert parameter in by_module.stdout
    if name == "filter":
        assert "max_p_multi" in by_module.stdout and "min_good_fraction" in by_module.stdout


@pytest.mark.parametrize(
    "name, argument, words",
    [("predict", "no_such_parameter=1", "no_such_parameter"), ("predict", "batch_size=x", "batch_size"),
     ("predict", "batch_size=0", "batch_size"), ("predict", "task=nonsense", "task"),
     ("predict", "missing_file.expt", "no such file"),
     ("predict", "output.no_such=1", "unknown parameter 'output.no_such'"),
     ("predict", "views=3", "views must be one of 1, 2, 4, 8"),
     ("filter", "task=None", "Not a possible choice for task: None"),
     ("simulate", "n_images=0", "n_images element is less than the minimum allowed value"),
     ("evaluate", "views=x", "views=x is not a number"),
     ("train", "epochs=x", "epochs=x is not a number: epochs takes int(value_min=1)")],
)
def test_bad_parameter_is_a_one_line_sorry(tmp_path, name, argument, words):
    result = command(BIN / f"diffnet.{name}", argument, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Sorry"), result.stderr
    assert words in lines[0]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_starts_with_one_usage_line(name):
    result = command(sys.executable, "-m", f"diffnet.{name}", "-h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: diffnet.{name} [options]"), result.stdout[:200]


def test_model_fast_help_quotes_the_figures_docs_commands_gives():
    from diffnet.predict import phil_scope

    docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `model.fast`"))
    help_text = " ".join(d.object.help for d in phil_scope.all_definitions() if d.path == "model.fast")

    def figures(text):
        return set(re.findall(r"\d+(?:\.\d+)*", text))

    assert figures(row) <= figures(help_text), sorted(figures(row) - figures(help_text))


@pytest.mark.parametrize("name", ["train", "predict", "evaluate"])
def test_a_command_module_leaves_torch_free_to_use_the_threads_it_is_given(name):
    # Importing DIALS first binds torch to cctbx's single-thread OpenMP stub: set_num_threads(2)
    # is then silently ignored and training runs on one core.
    probe = (f"import diffnet.{name}, torch; torch.set_num_threads(2); "
             "from dials.util.options import ArgumentParser; print(torch.get_num_threads())")
    done = command(sys.executable, "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "2"


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="only a venv over a system DIALS needs the pointer")
def test_commands_run_in_the_venv_without_libtbx_build_exported(tmp_path):
    # Debian's libtbx looks for its environment under the venv's prefix and crashed on import
    # unless the user exported LIBTBX_BUILD; the package now points it at the system one.
    env = {k: v for k, v in os.environ.items() if k != "LIBTBX_BUILD"}
    for args in ([BIN / "diffnet.predict", "-c"], [sys.executable, "-m", "diffnet.filter", "-c"],
                 [sys.executable, "-c", "import dials_diffnet, dxtbx.model, os; print(os.environ['LIBTBX_BUILD'])"]):
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip().endswith(f"lib/cctbx/python{sys.version_info[0]}.{sys.version_info[1]}")
