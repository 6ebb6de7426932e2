"""The notebook's first code cell (tag `install`): installs only what the runtime lacks, from wheels in the
attached datasets where there are, driven through the notebook's own cell with pip mocked and a tmp folder as
the datasets' root."""

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


@pytest.fixture(autouse=True)
def inputs(cell, tmp_path, monkeypatch):
    """An empty tmp folder stands in for /kaggle/input (the one root searched for wheels)."""
    monkeypatch.setitem(cell, "WHEEL_ROOTS", [tmp_path])
    return tmp_path


def wheel(folder, name):
    """An (empty) wheel file `name` in `folder`, made with its parents."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).touch()
    return folder / name


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
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(ast.parse(code[0].source))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert imported == {"importlib", "pathlib", "subprocess", "sys"}
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


def test_offline_stops_with_a_message_naming_the_packages_and_how_to_attach_them(cell, monkeypatch, inputs):
    hide(monkeypatch, "pydicom")
    pip = Pip(fail=True)
    with pytest.raises(RuntimeError) as error:
        cell["install_missing"](run=pip)
    message = str(error.value)
    assert message.startswith("pip could not install pydicom>=3.0.1 (")
    assert "Internet on" in message and "run this cell again" in message
    assert f"a dataset holding a wheel of each (this cell looks for {inputs}/<dataset>/pydicom-*.whl," in message
    assert len(pip.calls) == 1


def test_an_attached_wheel_is_installed_with_no_index_and_said(cell, monkeypatch, capsys, inputs):
    hide(monkeypatch, "pydicom")
    found = wheel(inputs / "pydicom-wheel", "pydicom-3.0.2-py3-none-any.whl")
    pip = Pip()
    assert cell["install_missing"](run=pip) == ["pydicom>=3.0.1"]
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "--no-index", str(found)]]
    assert capsys.readouterr().out == (f"Installing pydicom>=3.0.1 (not installed; from {found}): "
                                       "needed by the imports below\n")


def test_wheel_names_compare_normalised_and_case_insensitively(cell, inputs):
    found = wheel(inputs / "datasets" / "owner" / "cv", "OpenCV_Python_Headless-4.11.0.86-cp37-abi3-linux.whl")
    wheel(inputs / "cv", "opencv_python-4.12.0.88-cp37-abi3-linux.whl")  # another distribution
    assert cell["newest_wheel"]("opencv-python-headless", cell["attached_wheels"]()) == found


def test_a_wheel_below_the_floor_is_ignored_and_pip_index_used(cell, monkeypatch, inputs):
    hide(monkeypatch, "pydicom")
    wheel(inputs / "old", "pydicom-2.4.4-py3-none-any.whl")
    pip = Pip()
    cell["install_missing"](run=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "pydicom>=3.0.1"]]


def test_a_wheel_at_the_floor_is_taken(cell, monkeypatch, inputs):
    """pydicom 3.0.1 (the floor: CI's Kaggle-like environment runs the version-sensitive tests with it) is accepted."""
    hide(monkeypatch, "pydicom")
    found = wheel(inputs / "w", "pydicom-3.0.1-py3-none-any.whl")
    pip = Pip()
    cell["install_missing"](run=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "--no-index", str(found)]]


def test_the_newest_satisfying_wheel_wins(cell, inputs):
    for folder, version in [("a", "3.0.2"), ("b", "2.4.4"), ("b", "3.0.10"), ("c/d", "3.0.9")]:
        wheel(inputs / folder, f"pydicom-{version}-py3-none-any.whl")
    newest = cell["newest_wheel"]("pydicom>=3.0.1", cell["attached_wheels"]())
    assert newest == inputs / "b" / "pydicom-3.0.10-py3-none-any.whl"  # versions compare as numbers


def test_wheels_cover_some_the_index_the_rest(cell, monkeypatch, capsys, inputs):
    hide(monkeypatch, "pydicom", "tqdm")
    found = wheel(inputs / "datasets" / "me" / "pydicom-wheel" / "pydicom-wheel", "pydicom-3.0.2-py3-none-any.whl")
    pip = Pip()
    assert cell["install_missing"](run=pip) == ["tqdm", "pydicom>=3.0.1"]
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "--no-index", str(found)],
                         [sys.executable, "-m", "pip", "install", "--quiet", "tqdm"]]
    assert capsys.readouterr().out == ("Installing tqdm (not installed), "
                                       f"pydicom>=3.0.1 (not installed; from {found}): needed by the imports below\n")


def test_offline_the_wheels_go_in_and_the_error_names_only_the_rest(cell, monkeypatch, inputs):
    hide(monkeypatch, "pydicom", "tqdm")
    wheel(inputs / "pydicom-wheel", "pydicom-3.0.2-py3-none-any.whl")

    def offline(command):  # pip without an index fails; --no-index with a wheel file works
        if "--no-index" not in command:
            raise subprocess.CalledProcessError(1, command)

    with pytest.raises(RuntimeError, match=r"^pip could not install tqdm \("):
        cell["install_missing"](run=offline)


@pytest.mark.parametrize("folder", [("dataset", "folder", "folder"),  # two folders inside a dataset
                                    ("competitions", "rsna", "train_images"),
                                    ("datasets", "owner", "data", "sub", "sub")])
def test_wheels_deeper_than_a_folder_inside_a_dataset_are_not_searched(cell, monkeypatch, inputs, folder):
    hide(monkeypatch, "pydicom")
    wheel(inputs.joinpath(*folder), "pydicom-3.0.2-py3-none-any.whl")
    assert cell["attached_wheels"]() == []
    pip = Pip()
    cell["install_missing"](run=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "pydicom>=3.0.1"]]


class Root:
    """A wheel root that records the patterns it is searched with."""

    def __init__(self):
        self.patterns = []

    def glob(self, pattern):
        self.patterns.append(pattern)
        return iter(())


def test_nothing_missing_searches_no_folder(cell, monkeypatch):
    root = Root()
    monkeypatch.setitem(cell, "WHEEL_ROOTS", [root])
    assert cell["install_missing"](run=Pip()) == [] and root.patterns == []
    hide(monkeypatch, "pydicom")
    cell["install_missing"](run=Pip())
    assert root.patterns == list(cell["WHEEL_PATTERNS"])


def test_old_pydicom_is_named_and_upgraded_then_a_restart_asked(cell, monkeypatch):
    old_pydicom(monkeypatch)
    assert cell["missing_packages"]() == {
        "pydicom>=3.0.1": "pydicom 2.4.4 is installed; the notebook needs >= 3.0.1"}
    pip = Pip()
    importlib.import_module("pydicom")  # the old one is imported in this kernel
    with pytest.raises(RuntimeError, match="restart the runtime"):
        cell["install_missing"](run=pip)
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--quiet", "pydicom>=3.0.1"]]


def test_old_pydicom_offline_says_which_version_is_needed(cell, monkeypatch):
    old_pydicom(monkeypatch, "2.0.0")
    with pytest.raises(RuntimeError, match=r"pip could not install pydicom>=3\.0\.1"):
        cell["install_missing"](run=Pip(fail=True))


def test_the_notebook_library_cells_skip_it():
    """Tests and benchmarks load parameters/setup/defs only: the install cell never runs pip there."""
    assert "install_missing" not in notebook_namespace({}, tags=("parameters",))


@pytest.mark.parametrize("version, old", [("3.0.0", True), ("3.0.1", False), ("3.0.2", False), ("3.1.0", False),
                                          ("10.0", False), ("3.0.1+local", False), ("2.4.4", True)])
def test_the_floor_compares_versions_as_numbers(cell, monkeypatch, version, old):
    old_pydicom(monkeypatch, version)
    assert ("pydicom>=3.0.1" in cell["missing_packages"]()) is old


def test_its_floors_are_the_requirements_floors():
    """A floor the cell checks is the one requirements.txt gives (the oldest version CI runs)."""
    from pathlib import Path

    floors = dict(line.split(">=") for line in (Path(NOTEBOOK).parent / "requirements.txt").read_text().splitlines()
                  if ">=" in line and not line.startswith("#"))
    checked = [req for req in notebook_namespace({}, tags=("install",))["RUNTIME_PACKAGES"].values() if ">=" in req]
    assert checked and all(floors[req.split(">=")[0]].strip() == req.split(">=")[1] for req in checked)


def builds(monkeypatch, torch, vision):
    """importlib.metadata reports these torch and torchvision versions."""
    real, versions = importlib.metadata.version, {"torch": torch, "torchvision": vision}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions.get(name) or real(name))


def other_build(name):
    """`import torchvision` where it was built for another torch (the message torchvision's import raises then)."""
    raise RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize("torch, vision, command", [
    ("2.14.1+cpu", "0.29.1", "torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"),  # PyPI's
    ("2.10.0", "0.29.1", "torchvision==0.25.0"),  # torch from PyPI, torchvision upgraded alone
    ("2.10.0+cu128", "0.25.0+cpu", "torchvision==0.25.0 --index-url https://download.pytorch.org/whl/cu128")])
def test_torch_and_torchvision_of_different_builds_stop_naming_both_and_the_fix(cell, monkeypatch, torch, vision,
                                                                               command):
    """The message names both versions, the import's error and the command installing this torch's torchvision
    (torch 2.N: 0.N+15) from torch's index, then asks for a restart."""
    builds(monkeypatch, torch, vision)
    with pytest.raises(RuntimeError) as error:
        cell["check_torchvision"](load=other_build)
    message = str(error.value)
    assert message.startswith(f"torch {torch} and torchvision {vision} come from different builds (import "
                              "torchvision: operator torchvision::nms does not exist). Install both from one index "
                              "at matching versions")
    assert f"`pip install --force-reinstall --no-deps {command}`, then restart the runtime" in message


def test_torchvision_is_checked_after_installing_and_other_errors_pass_unchanged(cell):
    """The cell ends with the check (after install_missing); here torchvision loads; an import error of another
    kind is not renamed; README's install notes give the same symptom and command."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = next(c for c in nb.cells if c.cell_type == "code").source
    assert source.rstrip().endswith("\ninstall_missing()\ncheck_torchvision()")
    cell["check_torchvision"]()

    def broken(name):
        raise RuntimeError("CUDA driver initialization failed")

    with pytest.raises(RuntimeError, match=r"^CUDA driver initialization failed$"):
        cell["check_torchvision"](load=broken)
    readme = (NOTEBOOK.parent / "README.md").read_text()
    assert "`RuntimeError: operator torchvision::nms does not exist`" in readme
    assert ("pip install --force-reinstall --no-deps torchvision==0.29.1 --index-url "
            "https://download.pytorch.org/whl/cpu") in readme
