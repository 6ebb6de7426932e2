"""Shared pytest setup: the repo's tools/ on sys.path, one generated study set per session, earlier sessions' temp
folders removed."""

import shutil
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from notebook_cells import notebook_namespace  # noqa: E402  (needs tools/ on sys.path)


def remove_earlier_sessions(own):
    """Remove the other numbered session folders beside `own` (pytest-<n>), but those of sessions still running (a
    .lock inside). pytest.ini keeps a failed session's folder (several GB); pytest removes it only when a later
    session fails (it counts the folders left after a passing session removed its own), so passing sessions would
    keep it for ever."""
    for folder in own.parent.glob("pytest-*"):
        if folder != own and folder.name[len("pytest-"):].isdigit() and not folder.is_symlink() \
                and not (folder / ".lock").exists():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def earlier_sessions_removed(tmp_path_factory, pytestconfig):
    """Each session starts by removing the earlier sessions' temp folders (not a --basetemp's neighbours)."""
    if not pytestconfig.getoption("basetemp"):
        remove_earlier_sessions(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def study_set(tmp_path_factory):
    """Root folder of a 12-study set in the competition layout (seed 0), generated once."""
    from make_demo_studies import make_study_set

    root = tmp_path_factory.mktemp("rsna_demo")
    make_study_set(root, n_studies=12, seed=0)
    return root


@pytest.fixture(scope="session")
def nb(study_set, tmp_path_factory):
    """The notebook's definitions, set up on the session's generated study set (CPU, small sizes)."""
    out = tmp_path_factory.mktemp("run")
    return notebook_namespace({"data_root": str(study_set), "output_dir": str(out), "img_size": 64,
                               "num_workers": 0, "backbone": "mobilenet_v3_small", "pretrained": "none",
                               "conditions": ["spinal_canal_stenosis"]})  # the plan's run; all five: own tests


@pytest.fixture(scope="session")
def loc_study_set(tmp_path_factory):
    """Root of a clean 24-study set with a 6-study test split (seed 5), generated once: the localiser and
    submission tests (issue 19) share it."""
    from make_demo_studies import make_study_set

    root = tmp_path_factory.mktemp("rsna_loc")
    make_study_set(root, n_studies=24, seed=5, test_studies=6)
    return root
