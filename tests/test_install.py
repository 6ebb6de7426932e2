"""The notebook's first code cell (tag `install`): installs only what the runtime lacks, driven through the
notebook's own cell with pip mocked."""

import ast
import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys

import nbformat
import pytest
from notebook_cells import NOTEBOOK, notebook_namespace


@pytest.fixture(scope="module")
def cell():
    """The install cell's namespace; running it here (everything installed) already must install nothing."""
    return notebook_namespace({}, tags=("install",))


class Pip:
    """Stands in for subprocess.check_call: records the commands; `fail` makes it fail as pip does offline."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, command):
        self.calls.append(command)
        if self.fail:
            raise subprocess.CalledProcessError(1, command)


def hide(monkeypatch, *names):
    """Make importlib.util.find_spec report `names` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def old_pydicom(monkeypatch, version="2.4.4"):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "pydicom" else real(name))


def test_is_the_first_code_cell_and_imports_only_the_standard_library():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["install"]
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(code[0].source))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert imported == {"importlib", "subprocess", "sys"}
    assert imported <= sys.stdlib_module_names
    # every third-party package the notebook imports is one the cell checks
    top = {alias.name.split(".")[0] if isinstance(node, ast.Import) else node.module.split(".")[0]
           for c in code[1:] for node in ast.walk(ast.parse(c.source))
           if isinstance(node, (ast.Import, ast.ImportFrom)) and (node.module if isinstance(node, ast.ImportFrom)
                                                                  else True)
           for alias in node.names}
    checked = set(notebook_namespace({}, tags=("install",))["RUNTIME_PACKAGES"])
    assert top - sys.stdlib_module_names - {"make_demo_studies"} == checked


def test_nothing_missing_installs_nothing(cell, capsys):
    pip = Pip()
    assert cell["missing_packages"]() == {}
    assert cell["install_missing"](run=pip) == []
    assert pip.calls == [] and capsys.readouterr().out == ""


def test_missing_packages_get_one_quiet_pip_command_and_one_line(cell, monkeypatch, capsys):
    hide(monkeypatch, "cv2", "tqdm")
    pip = Pip()
    assert cell["install_missing"](run=pip) == ["opencv-python-headless", "tqdm"]
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "opencv-python-headless", "tqdm"]]
    out = capsys.readouterr().out
    assert out == ("Installing opencv-python-headless (not installed), tqdm (not installed): "
                   "needed by the imports below\n")


def test_offline_stops_with_a_message_naming_the_packages_and_how_to_attach_them(cell, monkeypatch):
    hide(monkeypatch, "pydicom")
    pip = Pip(fail=True)
    with pytest.raises(RuntimeError) as error:
        cell["install_missing"](run=pip)
    message = str(error.value)
    assert message.startswith("pip could not install pydicom>=3.0.2 (")
    assert "Internet on" in message and "--no-index --find-links" in message and "run this cell again" in message
    assert len(pip.calls) == 1


def test_old_pydicom_is_named_and_upgraded_then_a_restart_asked(cell, monkeypatch):
    old_pydicom(monkeypatch)
    assert cell["missing_packages"]() == {
        "pydicom>=3.0.2": "pydicom 2.4.4 is installed; the notebook needs >= 3.0.2"}
    pip = Pip()
    importlib.import_module("pydicom")  # the old one is imported in this kernel
    with pytest.raises(RuntimeError, match="restart the runtime"):
        cell["install_missing"](run=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "pydicom>=3.0.2"]]


def test_old_pydicom_offline_says_which_version_is_needed(cell, monkeypatch):
    old_pydicom(monkeypatch, "2.0.0")
    with pytest.raises(RuntimeError, match=r"pip could not install pydicom>=3\.0\.2"):
        cell["install_missing"](run=Pip(fail=True))


def test_the_notebook_library_cells_skip_it():
    """Tests and benchmarks load parameters/setup/defs only: the install cell never runs pip there."""
    assert "install_missing" not in notebook_namespace({}, tags=("parameters",))


@pytest.mark.parametrize("version, old", [("3.0.1", True), ("3.0.2", False), ("3.1.0", False), ("10.0", False),
                                          ("3.0.2+local", False), ("2.4.4", True)])
def test_the_floor_compares_versions_as_numbers(cell, monkeypatch, version, old):
    old_pydicom(monkeypatch, version)
    assert ("pydicom>=3.0.2" in cell["missing_packages"]()) is old


def test_its_floors_are_the_requirements_floors():
    """A floor the cell checks is the one requirements.txt gives (the oldest version CI runs)."""
    from pathlib import Path

    floors = dict(line.split(">=") for line in (Path(NOTEBOOK).parent / "requirements.txt").read_text().splitlines()
                  if ">=" in line and not line.startswith("#"))
    checked = [req for req in notebook_namespace({}, tags=("install",))["RUNTIME_PACKAGES"].values() if ">=" in req]
    assert checked and all(floors[req.split(">=")[0]].strip() == req.split(">=")[1] for req in checked)
