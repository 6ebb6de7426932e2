"""bench/throughput.py (issue 7): the --tiny run prints every row of its table with usable numbers;
bench/gpu_check.py --dry-run passes; bench/cache_size.py --tiny (issue 24 item 6) measures the arithmetic's bytes.
Both print the bare training step's rate at the notebook's grids (/ 4 on the CPU) beside the cost model's projected
samples/s (issue 29 item 7): the projected figures are checked against the notebook's cost functions here."""

import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\((a|a'|b|b'|c|d|e|f)\)\s*\|")
RATE = re.compile(r"^(?P<prefix>(?:\(9\) )?)training rate at (?P<px>\d+) px \((?P<label>[^)]*)\) \| measured "
                  r"(?P<measured>[\d.]+) samples/s \| projected (?P<projected>[\d.]+) samples/s on one T4 \| "
                  r"(?P<here>[^|]*) \| measured/projected (?P<ratio>[\d.e+-]+) \(vs one T4\) \| "
                  r"(?P<gflop>[\d.]+) GFLOP per training sample$", flags=re.MULTILINE)
SCALING = re.compile(r"^(?P<prefix>(?:\(9\) )?)grid scaling (?P<small>\d+) px vs (?P<large>\d+) px: measured "
                     r"(?P<speed>[\d.]+)x the samples/s, projected (?P<flops>[\d.]+)x \(the FLOPs ratio\); "
                     r"(?P=small) px keeps (?P<keeps>[\d.]+) of the speed its FLOPs give against (?P=large) px: with "
                     r"the hours anchored at (?P=large) px, those projected at (?P=small) px x (?P<hours>[\d.]+)$",
                     flags=re.MULTILINE)


def half_unit(text):
    """Half a unit of the last printed digit: the rounding error of a printed number."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0**-decimals


@pytest.fixture(scope="module")
def definitions():
    """The notebook's parameters and defs cells (CONFIG as written, img_size 'auto'; the cost model's functions)."""
    from notebook_cells import notebook_namespace  # tools/ is on sys.path (conftest)

    return notebook_namespace({}, tags=("parameters", "defs"))


def bench_module(name):
    """A bench/ script imported as a module (its settings: throughput.PRESETS, gpu_check.TINY), with bench/ on
    sys.path as tests/test_cost.py puts it."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module(name)


def check_rates(stdout, definitions, overrides, prefix=""):
    """The measured-vs-projected lines of a CPU run at the notebook's grids / 4: one per grid, the default run's
    first (merge_config of CONFIG as written: SHARED_IMG_SIZE, 128) then the plan's (the spinal canal alone:
    PLAN_IMG_SIZE, 256); each projected samples/s equal to the notebook's t4_rate / (3 x classifier_flops) at the
    measured grid with the run's model settings (`overrides` merged into CONFIG), computed here; the ratio and the
    grid-scaling line from the printed figures. Returns {px: measured samples/s as printed}."""
    nb = definitions
    written = nb["CONFIG"]
    default = nb["merge_config"](written, {})
    plan = nb["merge_config"](written, {"conditions": [nb["SPINAL"]]})
    assert (default["img_size"], plan["img_size"]) == (nb["SHARED_IMG_SIZE"], nb["PLAN_IMG_SIZE"]) == (128, 256)
    config = nb["merge_config"](written, overrides)
    t4_rate = nb["plan_fold_flops"](config, nb["PLAN_BACKBONE"]) / (nb["PLAN_FOLD_HOURS_T4"] * 3600)
    assert nb["training_projection"](config, nb["real_data_rows"](config))["t4_rate"] == pytest.approx(t4_rate)
    assert f"= {t4_rate / 1e12:.4f} TFLOP/s effective)" in stdout and f"{prefix}training rate vs" in stdout

    lines = [m.groupdict() for m in RATE.finditer(stdout)]
    assert [(int(r["px"]), r["prefix"]) for r in lines] == [(128 // 4, prefix), (256 // 4, prefix)], stdout
    assert "the default run: 5 conditions, standing for 128 px" in lines[0]["label"]
    assert "the plan's run: spinal canal alone, standing for 256 px" in lines[1]["label"]
    measured = {}
    for r in lines:
        px, m, projected, ratio = int(r["px"]), float(r["measured"]), float(r["projected"]), float(r["ratio"])
        train_flops = 3 * nb["classifier_flops"](config, px, config["num_slices"])
        expected = t4_rate / train_flops
        assert abs(projected - expected) <= half_unit(r["projected"]) + 1e-9 * expected, (r, expected)
        assert abs(float(r["gflop"]) - train_flops / 1e9) <= half_unit(r["gflop"])
        assert m > 0 and math.isfinite(m)
        assert ratio == pytest.approx(m / expected, rel=half_unit(r["measured"]) / m + 1e-3)  # 4 digits printed
        assert r["here"] == "no GPU_SPEED factor for this device"
        measured[px] = m

    scaling = SCALING.search(stdout)
    assert scaling and scaling["prefix"] == prefix, stdout
    small, large = int(scaling["small"]), int(scaling["large"])
    assert (small, large) == (32, 64)
    flops = {px: nb["classifier_flops"](config, px, config["num_slices"]) for px in (small, large)}
    assert float(scaling["flops"]) == pytest.approx(flops[large] / flops[small], abs=0.0051)
    speed = measured[small] / measured[large]
    assert float(scaling["speed"]) == pytest.approx(speed, abs=0.0051 + 0.01 * speed)
    keeps = speed / (flops[large] / flops[small])
    assert float(scaling["keeps"]) == pytest.approx(keeps, abs=0.00051 + 0.01 * keeps)
    assert float(scaling["hours"]) == pytest.approx(1 / float(scaling["keeps"]), abs=0.0051 + 0.01 / keeps)
    return measured


def test_tiny_benchmark_prints_every_row_with_positive_finite_numbers(tmp_path, definitions):
    figures = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--tiny", "--work", str(tmp_path),
                          "--json", str(figures)], cwd=REPO, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("le3ba_v9 throughput") and "device " in lines[0] and "torch " in lines[0]
    assert "batch 4" in lines[1] and "img 64" in lines[1] and "mobilenet_v3_small" in lines[1]

    rows = {}
    for line in lines:
        if ROW.match(line):
            cells = [c.strip() for c in line.split("|")]
            rows.setdefault(cells[0], []).append(cells)
    assert set(rows) == {"(a)", "(a')", "(b)", "(b')", "(c)", "(d)", "(e)", "(f)"}, run.stdout
    for cells in (cells for found in rows.values() for cells in found):
        value = float(cells[2])
        assert math.isfinite(value) and value > 0, cells
    units = {key: {cells[3] for cells in found} for key, found in rows.items()}
    assert units["(a)"] == units["(b)"] == units["(d)"] == units["(f)"] == {"samples/s"}
    assert units["(e)"] == {"slices/s"}
    for key in ("(a)", "(b)"):
        assert float(rows[key][0][4]) > 0  # ms/step

    a, b, c = (rows[k][0][2] for k in ("(a)", "(b)", "(c)"))
    expected = float(b) / float(a)
    tolerance = half_unit(c) + expected * (half_unit(b) / float(b) + half_unit(a) / float(a))
    assert abs(float(c) - expected) <= tolerance * 1.001, (a, b, c)

    loaders = {cells[1]: cells for cells in rows["(d)"]}
    assert any("num_workers=0" in name for name in loaders) and any("num_workers=1" in name for name in loaders)
    for cells in rows["(d)"] + rows["(e)"]:
        assert float(cells[6]) > 0  # per worker
    assert "estimated epoch of an RSNA-sized fold" in run.stdout

    dumped = json.loads(figures.read_text())
    assert dumped["c_ratio"] == dumped["b_train_one_epoch"]["samples_per_s"] / dumped["a_bare_train"]["samples_per_s"]
    assert dumped["rsna_fold_epoch_estimate"]["epoch_s"] > 0
    augment = dumped["f_device_augmentation"]
    assert augment["samples_per_s"] == pytest.approx(1000 * augment["batch"] / augment["ms_per_step"], rel=1e-9)
    assert not list(tmp_path.glob("run_*"))  # the run's caches and outputs are removed

    # (a) at the notebook's grids / 4 against the projection; 64 px is --tiny's img_size: (a)'s own figure
    tiny = bench_module("throughput").PRESETS["tiny"]
    measured = check_rates(run.stdout, definitions, {k: tiny[k] for k in (
        "backbone", "img_size", "batch_size", "num_slices", "gru_hidden", "attention_hidden")})
    assert measured[64] == float(a)
    grids = dumped["a_grids"]
    assert [(g["px"], g["stands_for_px"]) for g in grids] == [(32, 128), (64, 256)]
    assert grids[1]["measured"] == dumped["a_bare_train"]
    for g in grids:
        assert g["ratio"] == g["measured_samples_per_s"] / g["samples_per_s"]["one T4"]
        assert g["samples_per_s"]["one T4"] == pytest.approx(g["t4_rate"] / g["train_flops_per_sample"], rel=1e-12)


def test_gpu_names_map_to_the_cost_models_gpu_speed_entries(definitions):
    """The measured-vs-projected lines compare with this GPU's projection where the notebook's GPU_SPEED has a
    factor for it (by torch.cuda.get_device_name), else with one T4's."""
    key = bench_module("throughput").gpu_speed_key
    speeds = definitions["GPU_SPEED"]
    assert key("Tesla T4", speeds) == "one T4" and key("NVIDIA L4", speeds) == "L4"
    for name in ("NVIDIA L40S", "NVIDIA H100 80GB HBM3", "NVIDIA H200", "Tesla P100-PCIE-16GB", "NVIDIA A100"):
        assert key(name, speeds) is None, name


def test_gpu_check_dry_run_prints_every_row_and_passes(tmp_path, definitions):
    """bench/gpu_check.py --dry-run: the GPU-only checks' code runs on the CPU (no figures); rows (1)-(9) PASS
    (row 7 trains a 2-epoch tiny fold and projects it with the notebook's project_run; row 8 runs a localiser
    forward in a child process through on_device and then the training processes' check; row 9 measures the bare
    training step at the notebook's grids / 4 and prints the cost model's projected samples/s beside it)."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--work", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = re.findall(r"^\((\d)\) .*\| (PASS|FAIL)$", run.stdout, flags=re.MULTILINE)
    assert {row for row, _ in rows} == set("123456789") and {v for _, v in rows} == {"PASS"}
    assert "(6) GPU check: kernel, verdict" in run.stdout and "(7) projected vs measured fold" in run.stdout
    assert re.search(r"^\(8\) section's GPU work in a child +\| ran on cpu, CUDA here uninitialised True ", run.stdout,
                     flags=re.MULTILINE)
    assert run.stdout.rstrip().endswith(f"{len(rows)} of {len(rows)} checks passed")
    measured = check_rates(run.stdout, definitions, bench_module("gpu_check").TINY, prefix="(9) ")
    row = re.search(r"^\(9\) training rate at each grid +\| 32 px ([\d.]+), 64 px ([\d.]+) samples/s +\| "
                    r"measured at each grid \(> 0\) +\| PASS$", run.stdout, flags=re.MULTILINE)
    assert row and [float(x) for x in row.groups()] == pytest.approx([measured[32], measured[64]], abs=0.051)


def test_cache_size_tiny_row_per_series_type_at_the_arithmetic_bytes():
    """bench/cache_size.py --tiny (3 studies, img_size 32, crop_side 2 x ceil(1.45 x 32 / 2) = 48): one row per series
    type with positive, finite sizes and times; the cache's files hold 7 x 48^2 bytes of crops + 7 of mask per
    sample, plus a few kB for the whole cache (.npy headers, issues.csv, done.json): within 1 % at this size; the
    projection is the measured bytes per sample x 1975 studies x 5/10/10 samples per study."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "cache_size.py"), "--tiny"], cwd=REPO,
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "img_size 32, crop_side 48, num_slices 7" in run.stdout.splitlines()[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| series type")]
    assert [r[0] for r in rows] == ["Sagittal T2/STIR", "Sagittal T1", "Axial T2"], run.stdout
    arithmetic = 7 * 48**2 + 7
    real = {"Sagittal T2/STIR": 1975 * 5, "Sagittal T1": 1975 * 10, "Axial T2": 1975 * 10}
    total = 0
    for series, conditions, samples, size, per_sample, arith, ratio, seconds, ms, full, gb in rows:
        assert {"Sagittal T2/STIR": "spinal_canal", "Sagittal T1": "foraminal", "Axial T2": "subarticular"}[series] \
            in conditions
        samples, size, seconds = int(samples), int(size), float(seconds)
        assert samples > 0 and size > 0 and math.isfinite(seconds) and seconds > 0 and float(ms) > 0
        assert abs(float(per_sample) - size / samples) <= 0.5
        assert int(arith) == arithmetic
        assert samples * arithmetic <= size <= samples * arithmetic * 1.01  # the arrays, plus < 1 % of small files
        assert float(ratio) == pytest.approx(size / samples / arithmetic, abs=5e-5)
        assert int(full) == real[series]
        projected = float(gb.split()[0])
        assert projected == pytest.approx(size / samples * real[series] / 1e9, abs=0.005) and projected > 0
        total += size / samples * real[series]
    assert f"Full data: {total / 1e9:.2f} GB" in run.stdout and "not a measurement on the real data" in run.stdout
