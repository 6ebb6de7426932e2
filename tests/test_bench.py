"""bench/throughput.py (issue 7): the --tiny run prints every row of its table with usable numbers;
bench/gpu_check.py --dry-run passes; bench/cache_size.py --tiny (issue 24 item 6) measures the arithmetic's bytes."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\((a|a'|b|b'|c|d|e|f)\)\s*\|")


def half_unit(text):
    """Half a unit of the last printed digit: the rounding error of a printed number."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0**-decimals


def test_tiny_benchmark_prints_every_row_with_positive_finite_numbers(tmp_path):
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


def test_gpu_check_dry_run_prints_every_row_and_passes(tmp_path):
    """bench/gpu_check.py --dry-run: the GPU-only checks' code runs on the CPU (no figures); rows (1)-(8) PASS
    (row 7 trains a 2-epoch tiny fold and projects it with the notebook's project_run; row 8 runs a localiser
    forward in a child process through on_device and then the training processes' check)."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--work", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = re.findall(r"^\((\d)\) .*\| (PASS|FAIL)$", run.stdout, flags=re.MULTILINE)
    assert {row for row, _ in rows} == {"1", "2", "3", "4", "5", "6", "7", "8"} and {v for _, v in rows} == {"PASS"}
    assert "(6) GPU check: kernel, verdict" in run.stdout and "(7) projected vs measured fold" in run.stdout
    assert re.search(r"^\(8\) section's GPU work in a child +\| ran on cpu, CUDA here uninitialised True ", run.stdout,
                     flags=re.MULTILINE)
    assert run.stdout.rstrip().endswith(f"{len(rows)} of {len(rows)} checks passed")


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
