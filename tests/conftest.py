"""Shared pytest setup: the repo's tools/ on sys.path and one generated study set per session."""

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))


@pytest.fixture(scope="session")
def study_set(tmp_path_factory):
    """Root folder of a 12-study set in the competition layout (seed 0), generated once."""
    from make_demo_studies import make_study_set

    root = tmp_path_factory.mktemp("rsna_demo")
    make_study_set(root, n_studies=12, seed=0)
    return root


NOTEBOOK = Path(__file__).resolve().parents[1] / "le3ba_v9.ipynb"
LIBRARY_TAGS = ("parameters", "setup", "defs")


def notebook_namespace(overrides, tags=LIBRARY_TAGS):
    """Execute the notebook's own cells tagged `tags` (None: every code cell) in-process, with
    CONFIG_OVERRIDES set as papermill would, and return the resulting namespace (a dict): tests call the
    notebook's definitions, never copies. The namespace is a registered module, so worker processes
    find its functions by name, as they find them in a kernel's __main__."""
    import types

    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    name = f"le3ba_v9_{len([m for m in sys.modules if m.startswith('le3ba_v9_')])}"  # one per call
    module = types.ModuleType(name)
    sys.modules[name] = module
    namespace = module.__dict__
    for cell in nb.cells:
        cell_tags = set(cell.metadata.get("tags", []))
        if cell.cell_type != "code" or (tags is not None and not cell_tags & set(tags)):
            continue
        exec(compile(cell.source, f"le3ba_v9.ipynb[{'/'.join(sorted(cell_tags))}]", "exec"), namespace)
        if "parameters" in cell_tags:
            namespace["CONFIG_OVERRIDES"] = dict(overrides)
    return namespace


@pytest.fixture(scope="session")
def nb(study_set, tmp_path_factory):
    """The notebook's definitions, set up on the session's generated study set (CPU, small sizes)."""
    out = tmp_path_factory.mktemp("run")
    return notebook_namespace({"data_root": str(study_set), "output_dir": str(out), "img_size": 64,
                               "num_workers": 0, "backbone": "mobilenet_v3_small", "pretrained": "none"})
