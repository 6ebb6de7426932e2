"""The notebook reads as a notebook (issue 30): a cell per component under a few lines of prose, numbered sections
in the order things run, the plan's task names in the headings, a first cell that says what is predicted and maps
the sections, every cell's tag where tools/notebook_cells.py looks for it."""

import ast
import re
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from notebook_cells import NOTEBOOK, outline  # noqa: E402

CELLS = nbformat.read(NOTEBOOK, as_version=4).cells
CODE = [c for c in CELLS if c.cell_type == "code"]
PLAN_TASKS = ["Task 1.1: the DICOM dataset", "Task 1.2: attention-MIL pooling",
              "Task 1.3: class-weighted cross entropy",
              "Task 2.1: the model", "Task 3.1: training", "Task 4.1: metrics and plots", "Post-training analysis"]


def headings(level):
    return [h for lv, h, _ in outline() if lv == level]


def test_no_code_cell_is_a_script():
    sizes = sorted((len(c.source.splitlines()), c.source.splitlines()[0]) for c in CODE)
    assert sizes[-1][0] <= 150, sizes[-5:]
    assert len(CODE) >= 60  # 38 cells in all before issue 30


def test_every_code_cell_follows_a_few_lines_of_prose():
    for before, cell in zip(CELLS, CELLS[1:]):
        if cell.cell_type == "code":
            first = cell.source.splitlines()[0]
            assert before.cell_type == "markdown", f"code cell without prose before it: {first}"
            lines = before.source.splitlines()
            if before is not CELLS[0]:
                assert 1 <= len(lines) <= 12, f"{len(lines)} lines of prose before {first}"


def test_sections_are_numbered_in_order_with_the_plans_task_names():
    sections = headings(2)
    numbers = [int(re.match(r"(\d+)\. ", h).group(1)) for h in sections]
    assert numbers == list(range(1, len(sections) + 1)) and len(sections) == 12, sections
    for task in PLAN_TASKS:
        assert sum(task in h for h in sections) == 1, task
    # subsections k.m sit under section k, numbered from 1 without gaps
    section = 0
    expected = 1
    for level, heading, _ in outline():
        if level == 2:
            section, expected = int(heading.split(".")[0]), 1
        elif level == 3:
            k, m = map(int, re.match(r"(\d+)\.(\d+) ", heading).groups())
            assert (k, m) == (section, expected), heading
            expected += 1


def test_the_first_cell_says_what_is_predicted_and_maps_the_sections():
    first = CELLS[0].source
    assert "25 targets" in first and "conditions: ['spinal_canal_stenosis']" in first
    assert "spinal canal" in first and "foraminal" in first and "subarticular" in first
    mapped = re.findall(r"^\| (\d+)(?:-(\d+))? ", first, flags=re.MULTILINE)
    covered = {n for a, b in mapped for n in range(int(a), int(b or a) + 1)}
    assert covered == set(range(1, 13)), covered


def defined(cell):
    names = set()
    for node in ast.parse(cell.source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_each_cell_that_runs_uses_only_what_earlier_cells_define():
    """Run all goes top to bottom: a run cell that called a function defined further down would fail. Every
    notebook-level name a cell reads (or the functions it calls read) is defined in an earlier cell."""
    cells = [c for c in CODE if "install" not in c.metadata.get("tags", [])]
    where = {}
    for i, cell in enumerate(cells):
        for name in defined(cell):
            where.setdefault(name, i)
    functions = {}
    for cell in cells:
        for node in ast.parse(cell.source).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):  # the names it reads and does not bind itself
                own = {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)} | {
                    n.id for n in ast.walk(node) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
                functions[node.name] = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - own

    def reach(names, seen):
        for name in names:
            if name in functions and name not in seen:
                seen.add(name)
                reach(functions[name], seen)
        return seen

    for i, cell in enumerate(cells):
        if "defs" in cell.metadata.get("tags", []):
            continue  # definitions run when called
        read = {n.id for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.Name)}
        needed = read | {n for f in reach(read, set()) for n in functions[f]}
        late = sorted(n for n in needed if where.get(n, -1) > i)
        assert not late, f"cell {i} ({cell.source.splitlines()[0]}) needs names defined later: {late}"


def test_the_tags_tools_rely_on():
    tags = [tuple(c.metadata.get("tags", [])) for c in CODE]
    for tag in ("install", "parameters", "setup"):
        assert tags.count((tag,)) == 1, tag
    assert tags.index(("install",)) < tags.index(("parameters",)) < tags.index(("setup",))
    assert set(tags) == {("install",), ("parameters",), ("setup",), ("defs",), ()}
    # a defs cell only defines (the one exception: the environment variable set before torch touches CUDA)
    for cell in CODE:
        if "defs" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Expr):
                    assert "os.environ.setdefault" in ast.unparse(node), ast.unparse(node)
                else:
                    assert isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.Import,
                                             ast.ImportFrom)), ast.unparse(node)[:80]
