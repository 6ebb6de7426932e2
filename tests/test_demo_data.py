"""Section 1: the demo's generated study set (make_demo_data): one folder per preset, one line printed."""

import json

import pytest
from make_demo_studies import QUIRKS  # tools/ is put on sys.path by conftest.py


@pytest.mark.parametrize("preset", ["clean", "realistic"])
def test_demo_data_keyed_by_preset_and_summarised_in_one_line(nb, tmp_path, capsys, preset):
    config = {**nb["CONFIG"], "demo_studies": 2, "demo_data": preset}
    folder = nb["make_demo_data"](tmp_path / "demo_data_2_seed42", config)
    assert folder.name == "demo_data_2_seed42" + ("_realistic" if preset == "realistic" else "")
    summary = json.loads((folder / "generator_summary.json").read_text())
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and len(printed[0]) < 300
    assert not any(str(s) in printed[0] for s in summary["reversed_series"] + summary["rle_series"])
    assert f"{summary['n_studies']} studies, {summary['n_dicom_files']} DICOM files" in printed[0]
    n_quirks = sum(len(v) for v in summary["quirks"].values())
    assert (f"{n_quirks} quirks of {len(QUIRKS)} kinds" if preset == "realistic" else "no quirks") in printed[0]
    assert ("realistic preset" in (folder / "GENERATED_BY.txt").read_text()) == (preset == "realistic")
    assert nb["make_demo_data"](tmp_path / "demo_data_2_seed42", config) == folder  # reused, not rebuilt
    assert capsys.readouterr().out == f"demo data: reusing {folder}\n"


def test_demo_data_unknown_preset_is_named(nb, tmp_path):
    with pytest.raises(ValueError, match="CONFIG\\['demo_data'\\] = 'real'"):
        nb["merge_config"](nb["CONFIG"], {"demo_data": "real"})  # at merge time, before any work
