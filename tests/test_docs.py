"""The docs say what a fresh clone sees: tests/README.md's test table lists exactly the files in tests/, no doc
carries a hand-copied pass count (pytest prints the count; the one measured CI time is in tests/README.md's CI
section), the README's first screen is the newcomer's: what it is, two commands, Kaggle, Colab, the GPUs; the
README's CONFIG and DEMO_PRESET tables hold every key at the notebook's value; pytest keeps temp folders of failures
only (pytest.ini)."""

import ast
import re
from pathlib import Path

import pytest
from notebook_cells import notebook_namespace

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "v9_Implementation_Plan.md", "v9_Architecture.md", "tests/README.md", "bench/RESULTS.md"]


def test_tests_readme_table_lists_every_test_file():
    readme = (REPO / "tests" / "README.md").read_text()
    section = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(tests/test_\w+\.py)` \|", section, flags=re.MULTILINE)
    assert len(listed) == len(set(listed))
    assert set(listed) == {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")}


def test_no_doc_copies_a_pass_count_or_points_outside_the_repository():
    for name in DOCS:
        text = (REPO / name).read_text()
        assert not re.search(r"\b\d+ (passed|tests? pass)", text), name
        for path in re.findall(r"`([^`\s]+/[^`\s]*)`", text):  # paths in backticks exist here or are made by a run
            assert not path.startswith(("/work", "../", "shared/")), f"{name}: {path}"


def test_readme_first_screen_is_for_a_newcomer():
    readme = (REPO / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    assert sections[:7] == ["Try it: two commands (no competition data, no GPU needed)", "On Kaggle", "On Colab",
                            "GPUs", "Long runs: time budget and continuing in a new session", "Kaggle submission",
                            "Install and the demo in detail"]
    first = readme.split("\n## GPUs\n")[0]
    assert "pip install -r requirements.txt\npython -m papermill le3ba_v9.ipynb" in first
    assert "GPU T4 x2" in first and "GPU L4" in first and "Internet" in first
    gpus = readme.split("\n## GPUs\n")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| (T4|L4|A100|H100|RTX Pro 6000 Blackwell|P100) \|.*\| ([^|]+) \|$", gpus, re.MULTILINE))
    assert set(rows) == {"T4", "L4", "A100", "H100", "RTX Pro 6000 Blackwell", "P100"}
    assert rows["T4"].startswith("`fp16`") and all(rows[g] == "`bf16`" for g in ("L4", "A100", "H100",
                                                                                 "RTX Pro 6000 Blackwell"))
    assert "Kaggle/docker-python#1546" in rows["P100"]
    # measurement logs and test inventories live elsewhere
    assert "peak RAM" not in readme and "| `tests/test_" not in readme


@pytest.fixture(scope="module")
def notebook():
    """The parameters and definition cells: CONFIG as written and DEMO_PRESET."""
    return notebook_namespace({}, tags=("parameters", "defs"))


def readme_table(header):
    """The README table under `header` (its first line) as [(key, value cell)]: the backticked first cell and the
    second cell of each row."""
    lines = (REPO / "README.md").read_text().split(f"\n{header}\n", 1)[1].splitlines()[1:]  # after |---|
    rows = []
    for line in lines:
        if not line.startswith("| "):
            break
        key, value = line[2:].split(" | ", 2)[:2]
        rows.append((re.fullmatch(r"`(\w+)`", key).group(1), value))
    return rows


def same(a, b):
    """Equal and of the same types all the way down: a tuple is no list, 1 is neither 1.0 nor True."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def check_table(rows, values, value_pattern):
    """Every key of `values` is a row once, every row is a key, and each row's backticked value (`value_pattern`
    matched against its value cell) is the key's value as a Python literal."""
    keys = [key for key, _ in rows]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    assert not twice, f"rows listed twice: {twice}"
    missing = [k for k in values if k not in keys]
    assert not missing, f"keys without a README row: {missing}"
    extra = [k for k in keys if k not in values]
    assert not extra, f"README rows that are no key: {extra}"
    wrong = {}
    for key, cell in rows:
        found = re.match(value_pattern, cell)
        if found is None or not same(ast.literal_eval(found.group(1)), values[key]):
            wrong[key] = f"README {cell} vs {values[key]!r}"
    assert not wrong, f"README value cells that differ from the notebook's: {wrong}"


def test_readme_config_table_holds_every_key_at_its_default(notebook):
    """README's CONFIG reference: one row per CONFIG key, none other, its Default cell exactly the backticked
    literal of the value in the parameters cell."""
    check_table(readme_table("| Key | Default | Meaning | Serves |"), notebook["CONFIG"], r"`([^`]+)`$")


def test_readme_demo_preset_table_holds_every_key_at_its_value(notebook):
    """README's DEMO_PRESET table: one row per key, none other, each cell starting with the backticked value (a
    note may follow it)."""
    check_table(readme_table("| Key | Demo value |"), notebook["DEMO_PRESET"], r"`([^`]+)`(?: |$)")


def test_pytest_keeps_the_temp_folders_of_the_last_failure_only(request, tmp_path):
    """pytest.ini is in effect: a session whose tests all pass removes its temp folder (several GB of generated
    studies and crop caches), one with a failure keeps it (only its failing tests' tmp_path and the session's
    fixtures' folders); conftest's first fixture removes the earlier sessions' folders, those of running sessions
    (a .lock inside) excepted."""
    from conftest import remove_earlier_sessions

    assert request.config.inipath == REPO / "pytest.ini"
    assert request.config.getini("tmp_path_retention_policy") == "failed"
    assert int(request.config.getini("tmp_path_retention_count")) == 1
    for name in ("pytest-3", "pytest-12", "pytest-13", "pytest-14", "other"):
        (tmp_path / name / "cache").mkdir(parents=True)
    (tmp_path / "pytest-13" / ".lock").touch()  # a session still running
    (tmp_path / "pytest-current").symlink_to(tmp_path / "pytest-14")
    remove_earlier_sessions(tmp_path / "pytest-14")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "pytest-13", "pytest-14", "pytest-current"]
