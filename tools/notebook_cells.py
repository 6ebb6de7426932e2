"""Run the notebook's own cells in-process, so that tests and benchmarks call its definitions and
never copy them. Used by tests/ and bench/."""

import contextlib
import sys
import types
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "le3ba_v9.ipynb"
LIBRARY_TAGS = ("parameters", "setup", "defs")  # not "install": tests and benchmarks never run pip


def notebook_namespace(overrides, tags=LIBRARY_TAGS, before_cell=None):
    """Execute the notebook's own cells tagged `tags` (None: every code cell) in-process, with
    CONFIG_OVERRIDES set as papermill would, and return the resulting namespace (a dict): tests call the
    notebook's definitions, never copies. The namespace is a registered module, so worker processes
    find its functions by name, as they find them in a kernel's __main__. `before_cell(namespace, source)`,
    when given, runs before each executed cell (a test replaces the training clock before the cell that
    trains)."""

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
        if before_cell is not None:
            before_cell(namespace, cell.source)
        exec(compile(cell.source, f"le3ba_v9.ipynb[{'/'.join(sorted(cell_tags))}]", "exec"), namespace)
        if "parameters" in cell_tags:
            namespace["CONFIG_OVERRIDES"] = dict(overrides)
    return namespace


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside the block, as the notebook's section 11 runs in its child process
    (process_main); the caller's count restored after. With two, the localisers' sub-pixel points round differently
    and a few crops, hence a run's terms, move by ~1e-4 (foraminal 0.3856 vs the report's 0.3857 on the flow run,
    2026-12-07): with one, bench scripts give a run's figures to the digit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def outline(path=NOTEBOOK):
    """The notebook's table of contents as a notebook UI draws it from the headings, with each code cell under its
    heading: (heading level, heading, code lines of each cell below it)."""
    import nbformat

    rows = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    level = len(line) - len(line.lstrip("#"))
                    rows.append([level, line.lstrip("#").strip(), []])
        elif rows:
            rows[-1][2].append(len(cell.source.splitlines()))
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The notebook's outline: its headings and the code cells under them")
    parser.add_argument("--outline", action="store_true", help="print the table of contents with cell sizes")
    if parser.parse_args().outline:
        for level, heading, sizes in outline():
            print(f"{'  ' * (level - 1)}{heading}" + (f"  [{', '.join(map(str, sizes))} lines]" if sizes else ""))
