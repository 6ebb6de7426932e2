"""Crop cache size and build time per series type (issue 24 item 6), measured with the notebook's own functions.

On a generated study set (clean preset), for each series type it builds, in a fresh temporary cache_dir, the cache
of that series type's conditions alone (build_sample_table + build_cache) and prints a markdown table: samples,
bytes of the cache's files (images.npy, masks.npy, issues.csv, done.json), bytes per sample against the arithmetic
num_slices x crop_side^2 + num_slices (the uint8 crops plus the bool mask), build time, and the full-data
projection: measured bytes per sample x the competition's samples of that series type (1,975 studies; 5 spinal,
10 foraminal, 10 subarticular targets per study). A sample's bytes are fixed by its shape, not by the DICOM files,
so the size projects; the build time depends on the real files' size and codec and is not projected.

Usage (from the repository root):
  python bench/cache_size.py                 # 24 studies, img_size 256 (crop_side 372): about 1 MB per sample
  python bench/cache_size.py 48 --img-size 128 --workers 1
  python bench/cache_size.py --tiny          # CI: 3 studies at img_size 32, a few seconds
Expected: bytes per sample within 1 % of the arithmetic (the .npy headers, issues.csv and done.json add a few kB
per cache); at 256 px 968,7xx bytes per sample, so 9.6 GB (spinal), 19.1 GB (foramina) and 19.1 GB (subarticular),
47.8 GB (44.6 GiB) in all on the full data; about 20 s in all on 2 cores (bench/RESULTS.md).
"""

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_studies import make_study_set  # noqa: E402  (needs tools/ on sys.path)
from notebook_cells import notebook_namespace  # noqa: E402

REAL_STUDIES = 1975
REAL_PER_STUDY = {"Sagittal T2/STIR": 5, "Sagittal T1": 10, "Axial T2": 10}  # samples per study: 5 levels x sides


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("studies", type=int, nargs="?", help="studies in the generated set (default 24; --tiny 3)")
    p.add_argument("--img-size", type=int, help="CONFIG['img_size'] (default 256; --tiny 32)")
    p.add_argument("--workers", type=int, help="build_cache workers (default: the CPU cores; --tiny 1)")
    p.add_argument("--tiny", action="store_true", help="CI size: 3 studies at img_size 32, in-process")
    a = p.parse_args(argv)
    studies = a.studies or (3 if a.tiny else 24)
    img_size = a.img_size or (32 if a.tiny else 256)
    tmp = Path(tempfile.mkdtemp(prefix="cache_size_"))
    with contextlib.redirect_stdout(sys.stderr):  # the notebook's own prints: stdout holds only the table
        make_study_set(tmp / "data", n_studies=studies, seed=0)
        nb = notebook_namespace({"data_root": str(tmp / "data"), "output_dir": str(tmp / "out"), "img_size": img_size,
                                 "num_workers": a.workers or (1 if a.tiny else None), "pretrained": "none"})
    config = nb["CONFIG"]
    workers, side, n = nb["worker_count"](config), nb["crop_side"](config), config["num_slices"]
    print(f"le3ba_v9 cache size: {studies} generated studies (clean), img_size {img_size}, crop_side {side}, "
          f"num_slices {n}, build_cache workers {workers}, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    print("| series type | conditions | samples | cache bytes | bytes/sample | arithmetic | measured/arithmetic "
          "| build s | ms/sample | full-data samples | full-data cache GB (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    total = 0
    for i, series in enumerate(REAL_PER_STUDY):
        conditions = [c for c, s in nb["CONDITION_SERIES"].items() if s == series]
        cfg = {**config, "conditions": conditions, "cache_dir": str(tmp / f"cache{i}")}
        with contextlib.redirect_stdout(sys.stderr):
            samples, _ = nb["build_sample_table"](cfg)
            # the notebook's own estimate (disk_needs: num_slices x crop_side^2 per sample) + the bool mask
            arithmetic = nb["disk_needs"](cfg, len(samples), 0)[cfg["cache_dir"]] / len(samples) + n
            start = time.perf_counter()
            nb["build_cache"](samples, cfg, workers)
            seconds = time.perf_counter() - start
        size = nb["folder_bytes"](cfg["cache_dir"])
        per_sample = size / len(samples)
        real = REAL_STUDIES * REAL_PER_STUDY[series]
        total += per_sample * real
        print(f"| {series} | {', '.join(conditions)} | {len(samples)} | {size} | {per_sample:.0f} | {arithmetic:.0f} "
              f"| {per_sample / arithmetic:.4f} | {seconds:.2f} | {1000 * seconds / len(samples):.2f} | {real} "
              f"| {per_sample * real / 1e9:.2f} ({per_sample * real / 2**30:.2f}) |")
    print()
    print(f"Full data: {total / 1e9:.2f} GB ({total / 2**30:.2f} GiB) in all; a projection (measured bytes per "
          f"sample x {REAL_STUDIES} studies x {'/'.join(map(str, REAL_PER_STUDY.values()))} samples per study), "
          "not a measurement on the real data.")
    shutil.rmtree(tmp)  # the study set and the caches


if __name__ == "__main__":
    main()
