"""Shared pytest setup: the repo's tools/ on sys.path and one generated study set per session."""

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from notebook_cells import notebook_namespace  # noqa: E402  (needs tools/ on sys.path)


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
